"""doge_jax has no import cycle (lazy imports included): a reference never imports its dispatcher."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_import_cycles_in_doge_jax():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "import_cycles.py"), "doge_jax"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.strip().endswith("0 import cycles among " + proc.stdout.split(" among ")[-1].strip())


def test_the_checker_finds_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg import a  # lazy, still a cycle\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "import_cycles.py"), "pkg"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "cycle: pkg.a <-> pkg.b" in proc.stdout
