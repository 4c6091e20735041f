"""The error every user mistake raises: the CLI prints its message and exits non-zero."""


class ConfigError(ValueError):
    """A user's configuration or input is wrong; the message lists every problem and its fix."""
