"""Errors a user can act on.

Every failure caused by input the user controls (a config key, a file, a set of special ids)
raises a subclass of :class:`UserError`. ``train.py`` and the scripts print such an error as one
paragraph and exit with status 2, without a traceback; anything else is a bug and keeps its
traceback.
"""


class UserError(ValueError):
    """An error in something the user supplied; its message says what and how to fix it."""


class ConfigError(UserError):
    """A bad config file, key, value or override."""


class TokenizerError(UserError):
    """A tokenizer file that is missing, unreadable or of an unknown format."""


class ExportError(UserError):
    """A checkpoint or Hugging Face folder that cannot be converted or read."""


class DataError(UserError):
    """Data that cannot be read: a missing, empty or malformed file or shard."""


class UsageError(UserError):
    """A script's command-line argument that is malformed or out of range."""
