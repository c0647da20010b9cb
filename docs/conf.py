"""Sphinx configuration of the mtl_optax documentation site.

Everything on the site comes from the repository itself: the API reference
from the docstrings (autodoc + autosummary), the examples from the committed
notebooks with their stored outputs (myst-nb, never executed here), and the
guides partly from README sections (MyST ``include``). Build with
``python -m sphinx -W -b html docs docs/_build/html``.
"""

import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS))

import api_families  # pylint: disable=wrong-import-position
import mtl_optax  # pylint: disable=wrong-import-position

project = "mtl_optax"
author = "the mtl_optax developers"
copyright = "2026, the mtl_optax developers"  # pylint: disable=redefined-builtin
release = mtl_optax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb",
                 ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "api_families.py", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# Notebooks are rendered with the outputs committed with them: the site build
# never runs a training loop.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

autosummary_generate = True
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Example", "example"), ("Examples", "example")]

# Broken references fail the build. The site links no other project's
# inventory (nothing is downloaded at build time), so only names from
# outside mtl_optax are exempt.
nitpicky = True
_EXTERNAL = (r"(jax|jaxlib|jnp|optax|flax|nnx|numpy|np|typing|collections"
             r"|chex|functools)(\..*)?"
             r"|Any|Callable|NamedTuple|Sequence|Mapping|Iterable|Optional"
             r"|Union|Literal|ArrayLike|PyTree|int|float|bool|str|tuple"
             r"|list|dict|None")
nitpick_ignore_regex = [(r"py:.*", _EXTERNAL)]
suppress_warnings = ["myst.header"]

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_title = "mtl_optax"
html_theme_options = {
    "repository_url": "",
    "use_repository_button": False,
    "show_toc_level": 2,
    # The two table pages need the width of the page-contents column.
    "secondary_sidebar_items": {"**": ["page-toc"], "choosing": [],
                                "from_pytorch": []},
}


def _write_api_pages(app, config):
  """One page per method family, from ``api_families.FAMILIES``.

  Runs at ``config-inited``, before autosummary generates the stub pages.
  """
  del app, config
  api = DOCS / "api"
  shutil.rmtree(api, ignore_errors=True)
  api.mkdir()
  groups = api_families.group_public_names()
  toc = []
  for slug, title, blurb, _ in api_families.FAMILIES:
    names = groups.get(slug)
    if not names:
      continue
    toc.append(slug)
    lines = [title, "=" * len(title), "", blurb, "",
             ".. currentmodule:: mtl_optax", "",
             ".. autosummary::", "   :toctree: generated", "   :nosignatures:",
             ""]
    lines += [f"   {name}" for name in names]
    (api / f"{slug}.rst").write_text("\n".join(lines) + "\n")
  layer = api_families.gram_weightings_names()
  if layer:
    toc.append("gram_weightings")
    title = "The Gram-weighting layer: mtl_optax.gram_weightings"
    lines = [title, "=" * len(title), "",
             ".. automodule:: mtl_optax.gram_weightings", "   :no-members:",
             "", ".. currentmodule:: mtl_optax.gram_weightings", "",
             ".. autosummary::", "   :toctree: generated", "   :nosignatures:",
             ""] + [f"   {name}" for name in layer]
    (api / "gram_weightings.rst").write_text("\n".join(lines) + "\n")
  index = ["API reference", "=============", "",
           "Every public name of ``mtl_optax``, grouped by family. Each "
           "method's page cites its paper, gives the update and its output "
           "scale, and carries an example that the test suite runs.", "",
           ".. toctree::", "   :maxdepth: 1", ""] + [f"   {s}" for s in toc]
  (api / "index.rst").write_text("\n".join(index) + "\n")


def _copy_notebooks(app, config):
  """The committed notebooks, with their stored outputs, as example pages."""
  del app, config
  examples = DOCS / "examples"
  examples.mkdir(exist_ok=True)
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    shutil.copy2(notebook, examples / notebook.name)


_CAPTIONED_EXAMPLE = re.compile(r"^(\s*)Examples? \((.*)$")


def _captioned_examples(app, what, name, obj, options, lines):
  """``Example (caption):`` headers become napoleon ``Example`` sections.

  The docstrings caption their example in the header, sometimes over two
  lines, which plain reStructuredText reads as a broken definition list. The
  caption becomes the first paragraph of the section instead. Runs before
  napoleon (priority 400 < 500).
  """
  del app, what, name, obj, options
  out, i = [], 0
  while i < len(lines):
    match = _CAPTIONED_EXAMPLE.match(lines[i])
    if not match:
      out.append(lines[i])
      i += 1
      continue
    indent, caption = match.group(1), [match.group(2)]
    while not caption[-1].rstrip().endswith("):") and i + 1 < len(lines):
      i += 1
      caption.append(lines[i].strip())
    i += 1
    caption[-1] = caption[-1].rstrip()[:-2] + "."
    body = next((line for line in lines[i:] if line.strip()), indent + "  ")
    body_indent = body[:len(body) - len(body.lstrip())]
    out.append(indent + "Example:")
    out += [body_indent + text[:1].upper() + text[1:] if k == 0
            else body_indent + text for k, text in enumerate(caption)]
    out.append("")
  lines[:] = out


def setup(app):
  app.connect("config-inited", _write_api_pages)
  app.connect("config-inited", _copy_notebooks)
  app.connect("autodoc-process-docstring", _captioned_examples, priority=400)
