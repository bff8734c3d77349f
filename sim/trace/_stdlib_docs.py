"""The ``stdlib-docstrings`` text, built by a fresh interpreter (see ``sim.trace.sources``).

Run as ``python -I -S _stdlib_docs.py``: imports only the standard library, writes the text to
stdout as UTF-8. Kept free of any kvsim import so that nothing but the Python version decides
the text.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings

_DOC_SEPARATOR = "\n\n----\n\n"

# Pure-Python modules (no C accelerator replacing their docstrings), sorted; fixed so that the
# text only changes with the Python version, never with what happens to be imported.
STDLIB_DOCSTRING_MODULES: tuple[str, ...] = (
    "argparse",
    "ast",
    "calendar",
    "configparser",
    "dataclasses",
    "difflib",
    "email.message",
    "enum",
    "fractions",
    "ftplib",
    "gettext",
    "http.client",
    "inspect",
    "ipaddress",
    "logging",
    "mailbox",
    "optparse",
    "pathlib",
    "pydoc",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "urllib.parse",
    "urllib.request",
    "zipfile",
)


def _public_doc(obj: object) -> str | None:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc else None


def collect() -> str:
    docs: list[str] = []
    for module_name in STDLIB_DOCSTRING_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # pragma: no cover - all are stdlib; kept for odd builds
            continue
        parts = [f"Module {module_name}"]
        if doc := _public_doc(module):
            parts.append(doc)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or getattr(obj, "__module__", None) != module_name:
                continue
            if inspect.isclass(obj):
                if doc := _public_doc(obj):
                    parts.append(f"class {module_name}.{attr}\n\n{doc}")
                for meth_name in sorted(vars(obj)):
                    meth = vars(obj)[meth_name]
                    if meth_name.startswith("_") or not inspect.isfunction(meth):
                        continue
                    if meth.__doc__ and (doc := _public_doc(meth)):
                        parts.append(f"method {module_name}.{attr}.{meth_name}\n\n{doc}")
            elif inspect.isfunction(obj) and obj.__doc__ and (doc := _public_doc(obj)):
                parts.append(f"function {module_name}.{attr}\n\n{doc}")
        docs.append("\n\n".join(parts))
    return _DOC_SEPARATOR.join(docs)




if __name__ == "__main__":
    # some modules expose deprecated aliases (typing.io) that warn when their docs are read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        text = collect()
    sys.stdout.buffer.write(text.encode("utf-8"))
