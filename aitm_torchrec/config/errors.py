"""The config's one error type.

Every problem with a config (a missing or unreadable file, bad YAML or EasyRec text, an unknown
key, a wrong type, a broken cross-field rule, a bad override) is raised as ``ConfigError``, whose
message names the file and the key path and says what is allowed. It is a ``ValueError``, so
callers that predate it still catch it.
"""


class ConfigError(ValueError):
    """A config problem, with the file and key path in the message."""
