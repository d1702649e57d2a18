"""Sphinx configuration of the lpa_jax documentation site.

Build it from the repository root (``tests/test_docs.py`` does, into a temporary folder)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Why this stack: Sphinx + myst-nb + autosummary is what optax and flax build their sites with.
``sphinx.ext.autosummary`` gives every public name a page of its own from its docstring (the
names are listed by hand in ``api.md``, and the test fails when a name of a package's
``__all__`` is missing there), napoleon reads the Google-style ``Args:`` / ``Returns:``
sections of the library's docstrings, and myst-nb renders the committed notebooks with their
outputs without running them (``nb_execution_mode = "off"``: the notebooks have a test of their
own).  Intersphinx is left out: the build runs without internet, and a remote inventory would
make it depend on it.
"""
import inspect
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # the library and experiments/ of this checkout

import lpa_jax  # noqa: E402
from sphinx.util import logging  # noqa: E402

logger = logging.getLogger(__name__)

project = "lpa_jax"
author = "the lpa_jax authors"
copyright = "the lpa_jax authors"  # noqa: A001
release = version = lpa_jax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
templates_path = ["_templates"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
# Not pages: this folder's README, the build output, and the files evidence.md includes.
exclude_patterns = ["README.md", "_build", "_generated", "**.ipynb_checkpoints"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# ---------------------------------------------------------------------------- the notebooks
# The notebooks live in the repository's notebooks/; getting_started.md lists them (a glob)
# from docs/notebooks/, which is filled afresh at every build, so a renamed notebook leaves no
# stale page behind.  They are shown with their committed outputs, never run here.
NOTEBOOKS = DOCS / "notebooks"
shutil.rmtree(NOTEBOOKS, ignore_errors=True)
NOTEBOOKS.mkdir()
for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
  shutil.copy2(path, NOTEBOOKS / path.name)
nb_execution_mode = "off"

# ---------------------------------------------------------------------------- the API reference
# One page per public name, generated into docs/_autosummary/ afresh at every build (a name
# dropped from api.md leaves no page behind).
shutil.rmtree(DOCS / "_autosummary", ignore_errors=True)
autosummary_generate = True
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" of a class become :ivar: fields, not attribute entries of their own: a
# NamedTuple's fields are then not described twice.
napoleon_use_ivar = True
# "eps, delta_eps, beta, varied: radius ..." stays one entry, not four copies of its text.
napoleon_use_param = False
napoleon_attr_annotations = False  # the signature shows the types

# ---------------------------------------------------------------------------- the evidence
# evidence.md includes experiments/results/README.md, whose links point at the suites' reports
# and READMEs beside it: files of the repository, not pages of this site.  The build includes
# a copy (docs/_generated/, written afresh at every build) in which those links are myst
# ``path:`` links (the linked file is copied into the site as a download), and a heading's
# links ("## 1. ... — [report](...)") move to a line of their own below it: a title's links
# would go into the page's table of contents, where a download link breaks the build.
RESULTS = ROOT / "experiments" / "results"
GENERATED = DOCS / "_generated"
LOCAL_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|#)([^)\s]+)\)")


def as_site_markdown(text: str) -> str:
  lines = []
  for line in LOCAL_LINK.sub(r"](path:../experiments/results/\1)", text).splitlines():
    title, sep, links = line.rpartition(" — ")
    if line.startswith("#") and sep and "](" in links:
      links = "See: " + links if links.startswith("[") else links[0].upper() + links[1:]
      lines += [title, "", links]
    else:
      lines.append(line)
  return "\n".join(lines) + "\n"


shutil.rmtree(GENERATED, ignore_errors=True)
GENERATED.mkdir()
(GENERATED / "results_README.md").write_text(as_site_markdown((RESULTS / "README.md").read_text()))

# ---------------------------------------------------------------------------- HTML
html_theme = "sphinx_book_theme"
html_title = f"lpa_jax {release}"
# The book theme keeps its search box in the sidebar; the pydata header's second one, which
# it would draw above the sidebar, is left out.
html_theme_options = {"show_toc_level": 2, "home_page_in_toc": True, "navbar_persistent": []}


def _constant_without_comment(app, what, name, obj, options, lines):
  """A module constant is documented by a ``#:`` comment above it.  Without one autodoc shows
  the docstring of its type (``dict``, ``tuple``, ``str``): say so, which fails the build."""
  doc = type(obj).__doc__
  if what in ("data", "attribute") and doc and "\n".join(lines).strip() == inspect.cleandoc(doc):
    lines.clear()
    logger.warning(f"{name} has no '#:' comment to document it", type="lpa_jax", subtype="doc")


def setup(app):
  app.connect("autodoc-process-docstring", _constant_without_comment)
