"""Every `doge_jax`, `convert` and `serve` import in the scripts no test runs whole (benchmarks/, the notebooks'
code cells, the README's python blocks) names a module and attribute that exist, so a moved module cannot leave
a benchmark broken until someone runs it."""

import ast
import importlib
import json
import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
OURS = ("doge_jax", "convert", "serve")


def _sources():
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        yield path.relative_to(REPO).as_posix(), path.read_text()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        yield path.relative_to(REPO).as_posix(), re.sub(r"^\s*[!%].*$", "", code, flags=re.M)  # shell/magics
    for path in [REPO / "README.md", *sorted(REPO.glob("*/README.md"))]:
        blocks = re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)
        if blocks:
            yield path.relative_to(REPO).as_posix(), "\n".join(blocks)


def _imports(text):
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in OURS:
            for alias in node.names:
                yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    yield node.lineno, alias.name, None


SOURCES = list(_sources())


@pytest.mark.parametrize("name, text", SOURCES, ids=[name for name, _ in SOURCES])
def test_every_import_of_ours_resolves(name, text):
    broken = []
    for line, module, attr in _imports(text):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            broken.append(f"{name}:{line}: import {module}: {e}")
            continue
        if attr not in (None, "*") and not hasattr(mod, attr):
            try:
                importlib.import_module(f"{module}.{attr}")
            except ImportError:
                broken.append(f"{name}:{line}: {module} has no {attr}")
    assert not broken, "\n".join(broken)
