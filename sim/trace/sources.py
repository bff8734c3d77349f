"""Texts to capture traces on, available offline on any machine.

Built-in sources (both ship with every CPython, so a capture is reproducible anywhere):

* ``pydoc`` — the standard library's ``pydoc_data.topics``: the 79 help topics of the language
  reference (~465K characters of technical English), concatenated in sorted key order, each
  preceded by a title line and separated by a blank line + ``----`` rule.
* ``stdlib-docstrings`` — docstrings of a fixed, sorted list of pure-Python standard-library
  modules: each module's docstring, then its public classes (with their public methods) and
  functions in name order. Shorter, API-reference style prose with code fragments — different
  in nature from ``pydoc``'s reference chapters. (~100K tokens; its exact text depends on the
  Python version, which is why a trace records the text's sha256.)

User files: ``file:PATH``, where PATH is one file, a glob (``file:notes/*.md``) or several of
either separated by commas; matched files are read as UTF-8 in sorted order and joined by a
blank line. A missing file or an empty glob raises a one-line CaptureError.
"""

from __future__ import annotations

import glob
import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sim.errors import CaptureError

_DOC_SEPARATOR = "\n\n----\n\n"

_BUILTIN_SOURCES = ("pydoc", "stdlib-docstrings")


@dataclass(frozen=True)
class TextSource:
    """A text ready for tokenisation.

    ``name``: filesystem-safe short name (used in trace directory names); ``source``: the spec
    it was loaded from (``pydoc``, ``file:...``); ``sha256``: hex digest of ``text`` in UTF-8.
    """

    name: str
    source: str
    text: str
    sha256: str

    @property
    def n_chars(self) -> int:
        return len(self.text)

    def describe(self) -> dict[str, object]:
        """The manifest's ``text`` entry."""
        return {
            "source": self.source,
            "name": self.name,
            "sha256": self.sha256,
            "n_chars": self.n_chars,
        }


def list_sources() -> list[str]:
    """Names of the built-in sources; any ``file:PATH`` is accepted too."""
    return list(_BUILTIN_SOURCES)


def source_name(source: str) -> str:
    """The filesystem-safe name of a text spec, without loading it (for trace directory names).

    Raises CaptureError for an unknown spec.
    """
    if source in _BUILTIN_SOURCES:
        return source
    if isinstance(source, str) and source.startswith("file:") and source[len("file:") :]:
        return _file_name(source[len("file:") :])
    raise CaptureError(
        f"unknown text source {source!r}; valid: {', '.join(_BUILTIN_SOURCES)}, file:PATH"
    )


def _make(name: str, source: str, text: str) -> TextSource:
    return TextSource(name, source, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return _DOC_SEPARATOR.join(f"{key}\n\n{topics[key].strip()}" for key in sorted(topics))


def _stdlib_docstrings_text() -> str:
    """Collected in a fresh interpreter that sees only the standard library (``-I -S``): what
    the calling process has imported (torch wraps ``inspect`` functions, for one) must not
    change the text, or a cached trace would look stale."""
    script = Path(__file__).with_name("_stdlib_docs.py")
    try:
        result = subprocess.run(
            [sys.executable, "-I", "-S", str(script)],
            capture_output=True,
            check=True,
            timeout=300,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise CaptureError(
            f"text stdlib-docstrings: collecting the docstrings failed ({exc})"
        ) from None
    return result.stdout.decode("utf-8")


def _file_name(spec: str) -> str:
    """Filesystem-safe name for a file source (first path's stem, a short hash of the spec)."""
    first = Path(spec.split(",")[0]).stem or "text"
    safe = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in first)[:24].strip("-.")
    return f"file-{safe or 'text'}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"


def file_paths(source: str) -> list[Path]:
    """The files a ``file:PATH[,PATH...]`` text spec names, globs expanded, in the order they
    are joined (each glob's matches sorted), without reading them. Raises one-line
    CaptureError for an empty path, a missing file or a glob that matches none."""
    if not source.startswith("file:") or not source[len("file:") :]:
        raise CaptureError("text file: needs a path, e.g. file:notes.txt or file:docs/*.md")
    spec = source[len("file:") :]
    paths: list[Path] = []
    for pattern in (p.strip() for p in spec.split(",")):
        if not pattern:
            raise CaptureError(f"text file:{spec}: empty path in the list")
        expanded = str(Path(pattern).expanduser())
        if glob.has_magic(expanded):
            matches = sorted(
                Path(m) for m in glob.glob(expanded, recursive=True) if Path(m).is_file()
            )
            if not matches:
                raise CaptureError(f"text file:{spec}: no file matches {pattern!r}")
            paths.extend(matches)
        else:
            path = Path(expanded)
            if not path.is_file():
                raise CaptureError(f"text file:{spec}: {pattern} does not exist or is not a file")
            paths.append(path)
    return paths


def _file_text(spec: str) -> str:
    paths = file_paths(f"file:{spec}")
    texts = []
    for path in paths:
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise CaptureError(
                f"text file:{spec}: {path} is not UTF-8 text ({exc.reason})"
            ) from None
        except OSError as exc:
            raise CaptureError(
                f"text file:{spec}: {path} cannot be read ({exc.strerror})"
            ) from None
    text = "\n\n".join(t.strip("\n") for t in texts)
    if not text.strip():
        raise CaptureError(f"text file:{spec}: the file(s) hold no text")
    return text


def load_text(source: str) -> TextSource:
    """Load a text by spec: ``pydoc``, ``stdlib-docstrings`` or ``file:PATH[,PATH...]``.

    Deterministic for a given Python version (built-ins) or file content. Raises CaptureError
    (one line) for an unknown spec or an unreadable file.
    """
    if not isinstance(source, str):
        raise CaptureError(f"text source must be a string, got {source!r}")
    if source == "pydoc":
        return _make("pydoc", source, _pydoc_text())
    if source == "stdlib-docstrings":
        return _make("stdlib-docstrings", source, _stdlib_docstrings_text())
    if source.startswith("file:"):
        spec = source[len("file:") :]
        if not spec:
            raise CaptureError("text file: needs a path, e.g. file:notes.txt or file:docs/*.md")
        return _make(_file_name(spec), source, _file_text(spec))
    raise CaptureError(
        f"unknown text source {source!r}; valid: {', '.join(_BUILTIN_SOURCES)}, file:PATH"
    )
