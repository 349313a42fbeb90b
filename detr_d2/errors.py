"""Errors a person can fix from the message alone (a bad path, file, image or config value).

The tools end with the message in one line and a non-zero exit for these (``tools/detr_tools/cli.py``);
any other exception is unexpected and keeps its traceback.
"""

__all__ = ["UserInputError"]


class UserInputError(ValueError):
    """Bad input named in the message, with what to do about it."""
