"""CI's static checks, run by the test command: lint, types, the API reference.

* `ruff check galore_optax` with the configuration in pyproject.toml;
* `pyright` (basic) on galore_optax/ and tests/support/typing_probe.py, whose calls with
  misspelled or inapplicable arguments must be type errors;
* `mkdocs build --strict`: the reference generated from the docstrings, with no
  broken link, no public name left out and no docstring the parser cannot read.

Each fails with the tool's own report.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*command, **env):
  proc = subprocess.run(
      command, cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, **env))
  assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stdout}\n{proc.stderr}"
  return proc.stdout + proc.stderr


def test_ruff():
  out = run(sys.executable, "-m", "ruff", "check", "galore_optax")
  assert "All checks passed" in out


def test_pyright():
  out = run(sys.executable, "-m", "pyright", PYRIGHT_PYTHON_IGNORE_WARNINGS="1")
  assert "0 errors" in out


def test_api_reference_builds_strictly(tmp_path):
  out = run(sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path),
            NO_MKDOCS_2_WARNING="1")
  assert "Documentation built" in out
  html = (tmp_path / "reference" / "optimizers" / "index.html").read_text()
  assert "galore_adamw" in html and "projected" in html  # a signature made it to the page
