"""One exception root for every user-facing error.

The CLI turns any :class:`KvsimError` into a single line on stderr and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

#: characters that would break or garble the one line of an error (line and paragraph
#: breaks, as str.splitlines counts them, and other control characters), shown escaped
_ESCAPED = {
    code: repr(chr(code))[1:-1]
    for code in (*range(0x20), 0x7F, 0x85, 0x2028, 0x2029)
    if code != 0x09  # a tab stays a tab
}


class KvsimError(Exception):
    """A problem with the user's input (config, trace, arguments), not a bug in kvsim.

    Its text is always one line: line breaks and control characters that come from the input
    (a key or a file name holding a newline) are shown escaped (``\\n``)."""

    def __str__(self) -> str:
        return super().__str__().translate(_ESCAPED)


class ConfigError(KvsimError):
    """An experiment config or a preset is malformed, unknown or impossible."""


class TraceError(KvsimError):
    """A trace is missing, truncated, corrupt or inconsistent with its manifest."""


class OutputError(KvsimError):
    """A result, figure or trace cannot be written (a full disk, a read-only directory, a file
    where a directory should be, a name too long for a file name)."""


class CaptureError(KvsimError):
    """A trace cannot be captured (missing model package, missing text, bad settings)."""


class StorageError(KvsimError):
    """Storage cannot be measured: the directory does not exist, is not writable, lacks the free
    space, or refuses O_DIRECT (``kvsim calibrate``)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM reached ``kvsim``: it stops as on Ctrl-C (every ``except KeyboardInterrupt``
    cleans up alike), then exits with 143 (128 + SIGTERM) instead of 130."""
