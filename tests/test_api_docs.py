"""The API reference: pdoc builds it from the docstrings with warnings as errors (a type
annotation it cannot resolve, a module that fails to import), and every public name has a
docstring."""
import importlib
import inspect
import subprocess
import sys

import pytest

MODULES = ("lpa_jax", "lpa_jax.perturb", "lpa_jax.train", "lpa_jax.models", "experiments.data")


def test_api_reference_builds_with_warnings_as_errors(tmp_path):
  res = subprocess.run([sys.executable, "-W", "error", "-m", "pdoc", *MODULES, "-o",
                        str(tmp_path)], capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  for name in MODULES:
    page = tmp_path.joinpath(*name.split(".")).with_suffix(".html")
    assert page.exists() and page.stat().st_size > 1000, name


@pytest.mark.parametrize("module", MODULES)
def test_every_public_name_has_a_docstring(module):
  m = importlib.import_module(module)
  missing = [n for n in getattr(m, "__all__", ()) if not inspect.getdoc(getattr(m, n))]
  assert not missing, f"{module}: no docstring for {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_every_public_function_shows_an_example(module):
  m = importlib.import_module(module)
  missing = [n for n in getattr(m, "__all__", ()) if inspect.isfunction(getattr(m, n))
             and ">>>" not in (inspect.getdoc(getattr(m, n)) or "")]
  assert not missing, f"{module}: no '>>>' example in the docstring of {missing}"
