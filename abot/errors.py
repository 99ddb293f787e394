"""User-facing errors: the CLI prints their message (which names the file, the key and the fix), no traceback."""


class AbotError(Exception):
    """Bad input from the user: a config, a file, a name. The message says what is wrong and how to fix it."""


class ConfigError(AbotError):
    """A configuration file or override is invalid."""
