"""Every ``>>>`` example in the docstrings of ``lpa_jax`` and ``experiments`` runs, as doctest.

Each module of both packages (``pkgutil.walk_packages``) is imported and its docstrings run
in a namespace holding the module's own globals and the names an example may take for granted
(``jax``, ``jnp``, ``np``, ``nn``, ``nnx``, ``optax``, ``lpa_jax``), with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE`` on.  The examples are also counted in the source itself (every
docstring, found with ``ast``): the number run must equal the number written, less those marked
``# doctest: +SKIP`` (each says why beside it: the TFDS data, a GPU, several processes,
minutes of training), so a module or a docstring the runner never reaches fails here instead
of passing unread.  The examples use tiny models and jit their heavier calls: the whole run
takes seconds of compiling on a CPU.
"""
import ast
import doctest
import importlib
import pathlib
import pkgutil
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lpa_jax

PACKAGES = ("lpa_jax", "experiments")
ROOT = pathlib.Path(__file__).resolve().parents[1]
GLOBS = dict(jax=jax, jnp=jnp, np=np, nn=nn, nnx=nnx, optax=optax, lpa_jax=lpa_jax)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    path = importlib.import_module(package).__path__
    found[package] = ROOT / package / "__init__.py"
    for info in pkgutil.walk_packages(path, package + "."):
      rel = pathlib.Path(*info.name.split("."))
      file = ROOT / rel / "__init__.py" if info.ispkg else ROOT / rel.with_suffix(".py")
      found[info.name] = file
  return found


MODULES = _modules()


def _written(file: pathlib.Path) -> tuple[int, int]:
  """(examples to run, examples marked +SKIP) in every docstring of a source file."""
  parser, run, skipped = doctest.DocTestParser(), 0, 0
  for node in ast.walk(ast.parse(file.read_text())):
    if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    doc = ast.get_docstring(node, clean=False)
    for example in parser.get_examples(doc or ""):
      if example.options.get(doctest.SKIP):
        skipped += 1
      else:
        run += 1
  return run, skipped


def test_every_module_with_examples_is_walked():
  walked = set(MODULES.values())
  files = [f for p in PACKAGES for f in (ROOT / p).rglob("*.py") if ">>>" in f.read_text()]
  assert files, "no '>>>' example anywhere: the search is broken"
  missing = [str(f.relative_to(ROOT)) for f in files if f not in walked]
  assert not missing, f"modules with examples that pkgutil.walk_packages does not reach: {missing}"


def test_examples_are_many_and_few_are_skipped():
  counts = [_written(f) for f in MODULES.values()]
  run, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
  lib = sum(_written(f)[0] for m, f in MODULES.items() if m.startswith("lpa_jax"))
  assert lib > 0 and run > 2 * skipped, (lib, run, skipped)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_docstring_examples_run(name, tmp_path, monkeypatch):
  expected, _ = _written(MODULES[name])
  if not expected:
    return  # nothing to run; importing would only cost time (entry points define flags)
  module = importlib.import_module(name)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' scratch dirs
  runner, report = doctest.DocTestRunner(optionflags=FLAGS), []
  for test in doctest.DocTestFinder().find(module, globs={**GLOBS, **vars(module)}):
    runner.run(test, out=report.append, clear_globs=True)
  failed, attempted = runner.failures, runner.tries
  assert not failed, f"{name}: {failed} of {attempted} examples failed\n" + "".join(report)
  assert attempted == expected, (
      f"{name}: {expected} examples written (not +SKIP), {attempted} run: a docstring the "
      "doctest finder does not reach (a nested function, a decorated or re-exported object?)")
