"""The package, tests, examples, benchmarks and notebooks pass the same lint (ruff, pyproject rules)."""

import importlib.util
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_repository_passes_ruff():
    assert importlib.util.find_spec("ruff") is not None, "ruff is not installed (the test extra)"
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
