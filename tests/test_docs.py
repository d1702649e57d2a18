"""The documentation site (docs/): it builds with warnings as errors, its internal links
resolve, its API reference holds every public name, and every Python block of its guides runs.

The site is built as CI would, ``sphinx-build -W --keep-going -b html docs <tmp>`` (docs/conf.py
says why Sphinx + myst-nb + autosummary); the notebooks are rendered from their committed
outputs, not run.
"""
import ast
import importlib
import inspect
import pathlib
import pkgutil
import posixpath
import re
import subprocess
import sys
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

import pytest

import lpa_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))


# --------------------------------------------------------------------------- the build
# The tests that read the built site share one build, on one pytest-xdist worker: the build
# rewrites docs/_autosummary, docs/notebooks and docs/_generated, so two at once would collide.
ONE_BUILD = pytest.mark.xdist_group("docs_site")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("site")
  res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
                        "-q", "-j", "1", str(DOCS), str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
  assert res.returncode == 0, "the docs build warned or failed:\n" + res.stderr[-6000:]
  return out


class _Links(HTMLParser):
  """Every ``href`` / ``src`` of a page, and every ``id`` it defines."""

  def __init__(self):
    super().__init__()
    self.links, self.ids = [], set()

  def handle_starttag(self, tag, attrs):
    for key, value in attrs:
      if key in ("href", "src") and value:
        self.links.append(value)
      elif key in ("id", "name") and value:
        self.ids.add(value)


def local_links(page: pathlib.Path) -> list[str]:
  parser = _Links()
  parser.feed(page.read_text(encoding="utf-8"))
  return parser.links


def page_ids(page: pathlib.Path) -> set[str]:
  parser = _Links()
  parser.feed(page.read_text(encoding="utf-8"))
  return parser.ids


def broken_links(site: pathlib.Path) -> list[str]:
  """Links from a built page to a file of the site that is not there, or to an anchor the
  target page does not define."""
  broken, ids = [], {}
  for page in sorted(site.rglob("*.html")):
    if {"_modules", "_static"} & set(page.relative_to(site).parts):  # viewcode's source
      continue                                     # listings, the theme's template macros
    for link in local_links(page):
      parts = urlsplit(link)
      if parts.scheme or parts.netloc:  # http(s), mailto, data: not this site's files
        continue
      target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
      if target.is_dir():
        target = target / "index.html"
      if not target.exists():
        broken.append(f"{page.relative_to(site)}: {link}")
      elif parts.fragment and target.suffix == ".html":
        if target not in ids:
          ids[target] = page_ids(target)
        if unquote(parts.fragment) not in ids[target]:
          broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
  return broken


@ONE_BUILD
def test_the_site_builds_with_warnings_as_errors_and_its_links_resolve(site):
  for page in ("index", "getting_started", "api", "evidence", "benchmarks",
               *(f"guides/{g.stem}" for g in GUIDES)):
    assert (site / f"{page}.html").exists(), page
  assert list(site.glob("notebooks/*.html")), "no notebook was rendered"
  broken = broken_links(site)
  assert not broken, "broken internal links:\n" + "\n".join(broken)


# --------------------------------------------------------------------------- the API reference
def documented_names(site: pathlib.Path) -> set[str]:
  """The Python objects the site documents, from its ``objects.inv``."""
  from sphinx.util.inventory import InventoryFile
  with open(site / "objects.inv", "rb") as f:
    inventory = InventoryFile.load(f, "", posixpath.join)
  data = inventory.data if hasattr(inventory, "data") else inventory
  return {name for kind, entries in data.items() if kind.startswith("py:") for name in entries}


def _module_level_names(module) -> list[str]:
  """Public names a module defines itself (functions, classes, constants), not imports."""
  names = []
  for node in ast.parse(inspect.getsource(module)).body:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.append(node.name)
    elif isinstance(node, (ast.Assign, ast.AnnAssign)):
      targets = node.targets if isinstance(node, ast.Assign) else [node.target]
      names += [t.id for t in targets if isinstance(t, ast.Name)]
  return [n for n in names if not n.startswith("_")]


def public_names() -> list[tuple[str, str]]:
  """``(module, name)`` for every name in the ``__all__`` of lpa_jax and each of its public
  subpackages; a subpackage without ``__all__`` (``lpa_jax.train``) stands for the public names
  its modules define."""
  packages = [lpa_jax] + [importlib.import_module(m.name) for m in
                          pkgutil.walk_packages(lpa_jax.__path__, "lpa_jax.")
                          if m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("_")]
  out = []
  for package in packages:
    if hasattr(package, "__all__"):
      out += [(package.__name__, n) for n in package.__all__]
      continue
    for m in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
      if not m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("_"):
        module = importlib.import_module(m.name)
        out += [(module.__name__, n) for n in _module_level_names(module)]
  return out


def _resolve(dotted: str):
  parts = dotted.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    for attr in parts[i:]:
      obj = getattr(obj, attr, None)
    return obj
  return None


def missing_from_reference(documented: set[str]) -> list[str]:
  """Public names the reference lacks.  A name documented once at another public path counts
  (``lpa_jax.perturb.lpa`` *is* ``lpa_jax.lpa``, documented there)."""
  objects = {id(_resolve(name)) for name in documented}
  missing = []
  for module, name in public_names():
    obj = getattr(importlib.import_module(module), name)
    if f"{module}.{name}" not in documented and id(obj) not in objects:
      missing.append(f"{module}.{name}")
  return missing


@ONE_BUILD
def test_every_public_name_is_in_the_api_reference(site):
  names = public_names()
  assert ("lpa_jax", "lpa") in names and ("lpa_jax.models", "get_model") in names
  assert ("lpa_jax.train.step", "make_train_step") in names
  missing = missing_from_reference(documented_names(site))
  assert not missing, ("public names missing from the API reference (add them to "
                       "docs/api.md):\n" + "\n".join(missing))


# Carried over from the pdoc-era test: the reference is only as good as the docstrings.
DOCSTRING_MODULES = ("lpa_jax", "lpa_jax.perturb", "lpa_jax.train", "lpa_jax.models",
                     "experiments.data")


@pytest.mark.parametrize("module", DOCSTRING_MODULES)
def test_every_public_name_has_a_docstring(module):
  m = importlib.import_module(module)
  missing = [n for n in getattr(m, "__all__", ()) if not inspect.getdoc(getattr(m, n))]
  assert not missing, f"{module}: no docstring for {missing}"


@pytest.mark.parametrize("module", DOCSTRING_MODULES)
def test_every_public_function_shows_an_example(module):
  m = importlib.import_module(module)
  missing = [n for n in getattr(m, "__all__", ()) if inspect.isfunction(getattr(m, n))
             and ">>>" not in (inspect.getdoc(getattr(m, n)) or "")]
  assert not missing, f"{module}: no '>>>' example in the docstring of {missing}"


# --------------------------------------------------------------------------- the guides' code
# A fenced ```python block runs; a block that cannot run here (it trains for real, joins other
# hosts) is written as a {code-block} directive, or marked by a "<!-- norun -->" line above it.
# A block may carry a tag (```python readme-test:nnx): tests/test_readme.py counts its lines too.
PYTHON_BLOCK = re.compile(r"(<!-- norun -->\n)?```python(?: readme-test:[\w-]+)?\n(.*?)```", re.S)
# What each guide's blocks print, in part: the examples do what the text says they do.
PRINTS = {
    "own_loop": ["loss ", "sign ", "(8, 10)"],
    "cuts": ["(8, 32) (8, 10)", "Unknown module path 'encoder/block3'",
             "does not separate Residual", "('stage1', 'stage2', 'stage3', 'features', 'logits')"],
    "chain": ["loss change, chain:", "comes after logit member", "are all activation-level",
              "is an optax gradient transformation", "(256, 10) (256,)"],
    "experiments": ["fashion_mnist cnn"],
    "k_runs": ["loss per run:"],
}


def guide_blocks(path: pathlib.Path) -> list[str]:
  return [code for norun, code in PYTHON_BLOCK.findall(path.read_text()) if not norun]


def test_the_guides_that_hold_python_are_the_ones_run():
  with_code = {g.stem for g in GUIDES if guide_blocks(g)}
  assert with_code == set(PRINTS), with_code
  skipped = sum(g.read_text().count("```{code-block} python") + g.read_text().count("norun")
                for g in GUIDES)
  assert skipped <= 4, f"{skipped} Python blocks in the guides are not run: keep them few"


@pytest.mark.parametrize("guide", sorted(PRINTS))
def test_guide_code_runs_top_to_bottom(guide, capsys, monkeypatch):
  path = DOCS / "guides" / f"{guide}.md"
  monkeypatch.chdir(ROOT)  # the guides read data from ../shared/data, as a reader would
  namespace = {"__name__": f"docs_guide_{guide}"}
  for i, code in enumerate(guide_blocks(path)):
    exec(compile(code, f"docs/guides/{guide}.md[block {i}]", "exec"), namespace)  # noqa: S102
  printed = capsys.readouterr().out
  for expected in PRINTS[guide]:
    assert expected in printed, f"{guide}: expected {expected!r} in what it printed:\n{printed}"
  assert not re.search(r"\bnan\b", printed, re.I), f"{guide} printed a NaN:\n{printed}"
