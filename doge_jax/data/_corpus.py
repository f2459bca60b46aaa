"""The default corpus: English prose that ships with every Python installation.

Why this text: the tiny config must train offline, on a fresh machine, with nothing downloaded. Every CPython
carries two bodies of real, edited English written for humans:

  * `pydoc_data.topics`: the Language Reference sections that `help('if')` prints (~80 topics, ~0.5 MB);
  * the docstrings of the public standard-library modules, classes and functions (~1.5 MB).

Both are prose with some code mixed in, which suits a small code-literate language model better than
word lists or lorem ipsum, and both are under the PSF licence like Python itself.

How it is made, so the same Python gives the same corpus byte for byte:

  * modules are found by walking `sysconfig.get_paths()['stdlib']` in sorted order and read with `ast`
    (never imported: importing `antigravity` opens a browser and `this` prints);
  * private modules and packages (a leading `_` in any path part), test packages (`test`, `tests`,
    `idle_test`, `test_*.py`) and `site-packages` are skipped, as are private classes and functions;
  * each module is one document: its qualified name, then each docstring under the dotted name of what it
    documents; each pydoc topic is one more document;
  * docstrings already seen are dropped (inherited boilerplate such as "Return repr(self)."), and
    documents are ordered by module name, then topic name.

A different Python version gives a different (but equally deterministic) corpus; the shipped tokenizer
records the version it was trained on.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig

_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "__pycache__"})


def _is_public_module_path(rel_path: str) -> bool:
    parts = rel_path.split(os.sep)
    if any(p.startswith("_") or p in _SKIP_DIRS for p in parts[:-1]):
        return False
    name = parts[-1]
    return name.endswith(".py") and not name.startswith(("_", "test_")) and name != "setup.py"


def _module_name(rel_path: str) -> str:
    parts = rel_path[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _module_files(stdlib: str) -> list[tuple[str, str]]:
    """(dotted module name, path) of every public standard-library module, sorted by name."""
    found = []
    for root, dirs, files in os.walk(stdlib):
        rel_root = os.path.relpath(root, stdlib)
        # Only real packages (and the top level) hold modules: skips config-3.x, lib-dynload and the like.
        dirs[:] = sorted(
            d
            for d in dirs
            if not d.startswith(("_", "."))
            and d not in _SKIP_DIRS
            and os.path.exists(os.path.join(root, d, "__init__.py"))
        )
        for name in sorted(files):
            rel = os.path.normpath(os.path.join(rel_root, name))
            if _is_public_module_path(rel) or (name == "__init__.py" and rel_root != "."):
                found.append((_module_name(rel), os.path.join(root, name)))
    return sorted(found)


def _docstrings(tree: ast.Module, module: str):
    """Yields (qualified name, docstring) for the module and its public classes and functions."""
    doc = ast.get_docstring(tree)
    if doc:
        yield module, doc

    def walk(body, prefix):
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.name.startswith("_"):
                    continue
                qual = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    yield qual, doc
                if isinstance(node, ast.ClassDef):
                    yield from walk(node.body, qual)

    yield from walk(tree.body, module)


@functools.lru_cache(maxsize=1)
def default_corpus() -> tuple[str, ...]:
    """The default corpus as a tuple of documents (see the module docstring); ~1k docs, ~2 MB.

    Parsing the standard library takes ~4 s on our CPU, at the start of every training run that uses this
    corpus, so the result is also kept on disk (`cache_file`), under a key made from what it is made of: this
    module's source, the Python version, and each module file's path, size and modification time. A file that
    cannot be read or written there only means parsing again."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = _module_files(stdlib)
    path = cache_file(files)
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        if isinstance(cached, list) and all(isinstance(d, str) for d in cached):
            return tuple(cached)
    except (OSError, ValueError):
        pass
    documents = _build(files)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(list(documents), f)
        os.replace(tmp, path)  # readers see the whole file or none
    except OSError:
        pass
    return documents


def cache_file(files: list[tuple[str, str]] | None = None) -> str:
    """Where the default corpus of this Python is kept: $DOGE_JAX_CACHE/.default_corpus/<key>.json (default
    ~/.cache/doge_jax)."""
    files = _module_files(sysconfig.get_paths()["stdlib"]) if files is None else files
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top  (only needed here)

    key = hashlib.sha1()
    with open(__file__, "rb") as f:
        key.update(f.read())
    key.update(sys.version.encode())
    for _, path in [*files, ("", topics.__file__)]:
        try:
            st = os.stat(path)
            key.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            key.update(f"{path}\0missing\n".encode())
    root = os.environ.get("DOGE_JAX_CACHE") or os.path.expanduser("~/.cache/doge_jax")
    return os.path.join(root, ".default_corpus", f"{key.hexdigest()}.json")  # a dot: no gs:// bucket name


def _build(files: list[tuple[str, str]]) -> tuple[str, ...]:
    """The corpus documents from the module `files` ((name, path), sorted) and pydoc's topics."""
    seen: set[bytes] = set()

    def fresh(text: str) -> bool:
        key = hashlib.sha1(text.strip().encode()).digest()
        if key in seen:
            return False
        seen.add(key)
        return True

    documents = []
    for module, path in files:
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, ValueError, OSError):
            continue  # lib2to3 test data and the like are deliberately not valid Python 3
        sections = [f"{name}\n\n{doc.strip()}" for name, doc in _docstrings(tree, module) if fresh(doc)]
        if sections:
            documents.append("\n\n".join(sections))

    from pydoc_data import topics  # pylint: disable=g-import-not-at-top  (only needed here)

    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text and fresh(text):
            documents.append(text)
    return tuple(documents)


def corpus_version() -> str:
    """Identifies the Python that made the default corpus (it differs between versions)."""
    return f"CPython {sys.version.split()[0]} stdlib docstrings + pydoc_data.topics"
