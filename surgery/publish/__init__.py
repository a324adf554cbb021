"""Publish a run or a model directory to the Hugging Face Hub, with a model card built from its measurements.

    from surgery.publish import publish
    publish("runs/quickstart", "my-user/tiny-gpt2-ln-free", dry_run="out/")   # write the folder only

`surgery publish` is the command line; `PublishRun` (surgery.publish.callback) publishes a run at the end of fit.
"""

from surgery.publish.assemble import assemble_folder, publish
from surgery.publish.source import PublishSource, find_source

__all__ = ["PublishSource", "assemble_folder", "find_source", "publish"]
