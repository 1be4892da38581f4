"""A real English corpus that needs no download: the documentation that ships inside Python itself.

`timl tokenize --dataset_path timl:python-docs` reads it, so the quickstart runs on a machine without network. It is
two sources, both part of every standard CPython install:

- the help topics that `help("assert")` shows (`pydoc_data.topics`, the language reference's prose), one document each;
- the docstrings of the standard library's Python modules, read from their source with `ast` (no module is
  imported, so none runs), one document per module, each docstring under a heading with its name and signature.

About 2 MB of text, or half a million GPT-2 tokens. The documents come in a fixed shuffled order, so that a validation
split taken from the front samples both sources. The text is that of the running Python's version: Python 3.11 and
3.12 give slightly different corpora.
"""

from __future__ import annotations

import ast
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

PYTHON_DOCS = "timl:python-docs"
TEXT_KEY = "text"

# Test suites hold docstrings about tests; the codec modules repeat the same generated docstring a hundred times.
_SKIPPED_FOLDERS = {"test", "tests", "idle_test", "encodings", "site-packages", "dist-packages", "__pycache__"}


def python_docs_documents() -> list[str]:
    """The corpus's documents, in a fixed shuffled order (the same on every install of the same Python version)."""
    documents = [*help_topic_documents(), *module_docstring_documents()]
    random.Random(0).shuffle(documents)
    return documents


def help_topic_documents() -> list[str]:
    """Python's help topics (the language reference as `help()` shows it), sorted by topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions leave pydoc_data out
        return []
    return [topics[name].strip() for name in sorted(topics)]


def module_docstring_documents(stdlib: Path | None = None) -> list[str]:
    """One document per standard-library module that has docstrings, in sorted path order."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    documents = []
    for path in _python_files(stdlib):
        module = ".".join(path.relative_to(stdlib).with_suffix("").parts).removesuffix(".__init__")
        document = _module_document(path, module)
        if document:
            documents.append(document)
    return documents


def _python_files(root: Path) -> list[Path]:
    paths = []
    for folder, subfolders, files in os.walk(root):
        # Pruning here, not filtering afterwards, keeps the walk out of site-packages, which can be huge.
        subfolders[:] = [name for name in subfolders if name not in _SKIPPED_FOLDERS]
        paths.extend(Path(folder, name) for name in files if name.endswith(".py"))
    return sorted(paths)


def _module_document(path: Path, module: str) -> str | None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # e.g. files written for another Python version
        return None
    sections = [f"{heading}\n\n{docstring}" for heading, docstring in _docstrings(tree, module)]
    return "\n\n\n".join(sections) or None


def _docstrings(node: ast.AST, heading: str) -> Iterator[tuple[str, str]]:
    """(heading, docstring) for the node and the classes and functions inside it, in source order."""
    docstring = ast.get_docstring(node)
    if docstring:
        yield heading, docstring
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.ClassDef):
            bases = ", ".join(ast.unparse(base) for base in child.bases)
            yield from _docstrings(child, f"class {child.name}({bases})" if bases else f"class {child.name}")
        elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _docstrings(child, f"def {child.name}({ast.unparse(child.args)})")
