"""Everything is in pyproject.toml; this only ships `doge_jax_lm_eval.pth` into site-packages.

That one-line file runs `doge_jax/eval/plugin.py` at interpreter start-up (without importing doge_jax or jax):
it registers the `doge_jax` model with lm-evaluation-harness once, and only if, lm-eval's models are imported,
so `lm_eval --model doge_jax` works. lm-eval 0.4.13 has no plugin entry points (see doge_jax/eval/plugin.py).
Wheels carry the file through build_py; editable installs (`pip install -e`) through editable_wheel, whose
unpacked-wheel hook `_install_namespaces` is the one place it lets a project add a top-level file.
"""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "doge_jax_lm_eval.pth"
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH)


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class EditableWithPth(editable_wheel):
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(SOURCE, os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": BuildWithPth, "editable_wheel": EditableWithPth})
