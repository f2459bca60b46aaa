"""Makes `lm_eval --model doge_jax` work: lm-eval 0.4.13 finds models only in its own registry, so doge-jax
registers itself there.

    register()   adds "doge_jax" to lm-eval's model registry as a lazy entry (nothing heavy is imported until
                 lm-eval builds the model). `import doge_jax.eval` and `python -m doge_jax.eval` call it.
    install()    a hook for interpreter start-up (the `doge_jax_lm_eval.pth` line that `pip install` puts in
                 site-packages runs it): it waits for lm-eval's model package to be imported, by the `lm_eval`
                 CLI or anyone else, and then calls register(). Costs nothing in processes that never import
                 lm-eval.

lm-eval only imports its built-in model table when its registry is empty, so register() imports that table first:
an entry added to an empty registry would hide `hf`, `local-completions` and the rest.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

NAME = "doge_jax"
TARGET = "doge_jax.eval.lm:DogeJaxLM"
_WATCHED = "lm_eval.models"


def register() -> None:
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
    from lm_eval.api.registry import model_registry

    if NAME not in model_registry:
        model_registry.register(NAME, target=TARGET)


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs register() right after `lm_eval.models` finishes importing, wherever that import comes from."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the inner find_spec from finding us again
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        inner = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return inner.create_module(spec)

            def exec_module(self, module):
                inner.exec_module(module)
                register()

        spec.loader = Loader()
        return spec


def install() -> None:
    if _WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
