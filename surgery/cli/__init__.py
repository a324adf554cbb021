"""The `surgery` command: the entry point, the LightningCLI subclass and its error messages, and one module per
plain command (`surgery.cli.commands`). Nothing below this package imports it."""

from surgery.cli.entry import main

__all__ = ["main"]
