"""The one error type for a bad config value, raised where the value is checked, with its full field path.

The message is one line that starts with the field (`config.data.path='x/*.jsonl' matched no files`); the entry
points print it without a traceback and exit 2. `field` holds the path under `config` ("data.path").
"""

from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.field = field
