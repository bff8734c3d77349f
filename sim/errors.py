"""One exception root for every user-facing error.

The CLI turns any :class:`KvsimError` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class KvsimError(Exception):
    """A problem with the user's input (config, trace, arguments), not a bug in kvsim."""


class ConfigError(KvsimError):
    """An experiment config or a preset is malformed, unknown or impossible."""


class TraceError(KvsimError):
    """A trace is missing, truncated, corrupt or inconsistent with its manifest."""


class OutputError(KvsimError):
    """A result, figure or trace cannot be written (a full disk, a read-only directory, a file
    where a directory should be, a name too long for a file name)."""


class CaptureError(KvsimError):
    """A trace cannot be captured (missing model package, missing text, bad settings)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM reached ``kvsim``: it stops as on Ctrl-C (every ``except KeyboardInterrupt``
    cleans up alike), then exits with 143 (128 + SIGTERM) instead of 130."""
