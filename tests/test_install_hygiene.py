"""`pip install doge-jax` keeps a preinstalled jax/jaxlib in range (Colab ships its own): the base dependencies
name jax only as a plain range, nothing pins jaxlib, and no installed dependency of doge-jax (transitively)
requires a jax or jaxlib that the installed one does not satisfy — so pip has nothing to replace."""

import importlib.metadata as md
import os
import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _name(req: Requirement) -> str:
    return re.sub(r"[-_.]+", "-", req.name).lower()


def test_jax_is_a_plain_range_and_extras_bring_the_accelerator_builds():
    project = _project()
    base = [Requirement(r) for r in project["dependencies"]]
    jax = [r for r in base if _name(r) == "jax"]
    assert len(jax) == 1 and not jax[0].extras and jax[0].specifier.contains("0.10.2")
    assert not any(_name(r) == "jaxlib" for r in base)
    for extra in ("tpu", "cuda12"):
        (req,) = [Requirement(r) for r in project["optional-dependencies"][extra]]
        assert _name(req) == "jax" and req.extras == {extra} and req.specifier == jax[0].specifier


def test_no_dependency_asks_for_another_jax_than_the_installed_one():
    installed = {"jax": Version(md.version("jax")), "jaxlib": Version(md.version("jaxlib"))}
    seen, todo, conflicts = set(), [Requirement(r) for r in _project()["dependencies"]], []
    while todo:
        req = todo.pop()
        name = _name(req)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if name in installed and not req.specifier.contains(installed[name], prereleases=True):
            conflicts.append(str(req))
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += [Requirement(r) for r in (md.requires(name) or [])]
        except md.PackageNotFoundError:
            continue
    assert not conflicts, f"these would make pip replace jax {installed}: {conflicts}"
    assert {"orbax-checkpoint", "flax", "grain", "gcsfs"} <= seen
