"""What `pip install .` installs: every doge_jax and convert subpackage, the presets as doge_jax.configs, convert; and never a
generic top-level name such as `configs` or `serve` (the server is its own distribution, serve/pyproject.toml)."""

import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _toml(path):
    with open(os.path.join(ROOT, path), "rb") as f:
        return tomllib.load(f)


def test_every_doge_jax_package_is_installed():
    listed = set(_toml("pyproject.toml")["tool"]["setuptools"]["packages"])
    found = {os.path.relpath(d, ROOT).replace(os.sep, ".") for top in ("doge_jax", "convert")
             for d, _, files in os.walk(os.path.join(ROOT, top)) if "__init__.py" in files}
    assert found <= listed, f"add to pyproject.toml [tool.setuptools] packages: {sorted(found - listed)}"
    assert {p.split(".")[0] for p in listed} == {"doge_jax", "convert"}
    assert _toml("pyproject.toml")["tool"]["setuptools"]["package-dir"] == {"doge_jax.configs": "configs"}


def test_serve_distribution_needs_no_jax():
    project = _toml("serve/pyproject.toml")["project"]
    names = {d.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip() for d in project["dependencies"]}
    assert not names & {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "doge-jax"}
    assert _toml("serve/pyproject.toml")["tool"]["setuptools"]["packages"] == ["doge_serve"]
