"""The errors a user's mistake or a damaged input raises: the CLI prints the message and exits non-zero."""


class ConfigError(ValueError):
    """A user's configuration or input is wrong; the message lists every problem and its fix."""


class InputFileError(ConfigError):
    """A file the run reads is unreadable: truncated, corrupt, not UTF-8, malformed, or a directory that cannot be
    made. The message names the file (and line, where there is one) and what to do about it."""


class CorpusUnreachable(ConfigError):
    """A `datasets` corpus (data.source=hf) could not be read: no network, offline mode, no such name, no cache.
    data.fallback=embedded catches it and calibrates on the embedded text instead."""
