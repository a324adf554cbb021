"""The one exception type users see: a message naming the problem and the fix."""


class SurgeryError(Exception):
    """Bad input or an unmet precondition. The CLI prints the message and exits with status 2."""
