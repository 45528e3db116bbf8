"""Errors that mean bad input: the CLI reports them in one line and exits with status 2."""


class ConfigError(ValueError):
    """A config value that cannot run (the message names the fix)."""
