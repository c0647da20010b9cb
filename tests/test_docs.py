"""The documentation site covers the whole public API (docs/ is built by CI).

The site itself is built with warnings as errors by ``.ci/run``; these checks
are the cheap part that needs no Sphinx: every public name has an API page,
and the method-choice table lists every method.
"""

import inspect
import pathlib
import re
import sys

import mtl_optax

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
sys.path.insert(0, str(DOCS))

import api_families  # pylint: disable=wrong-import-position


def test_every_public_name_has_an_api_page():
  groups = api_families.group_public_names()   # raises on an unmapped name
  documented = {name for names in groups.values() for name in names}
  assert documented == set(mtl_optax.__all__)


def test_the_gram_weighting_layer_is_documented():
  from mtl_optax import gram_weightings  # pylint: disable=import-outside-toplevel
  assert api_families.gram_weightings_names() == sorted(gram_weightings.__all__)
  assert gram_weightings.__all__


def _factories():
  """Public functions that build a transformation (``num_tasks`` first)."""
  out = set()
  for name in mtl_optax.__all__:
    value = getattr(mtl_optax, name)
    if inspect.isfunction(value) and list(inspect.signature(
        value).parameters)[:1] == ["num_tasks"]:
      out.add(name)
  return out


def test_choosing_table_lists_every_method_and_only_real_ones():
  text = (DOCS / "choosing.md").read_text()
  rows = set(re.findall(r"^\| \{func\}`~mtl_optax\.(\w+)`", text, re.M))
  assert _factories() <= rows, sorted(_factories() - rows)
  assert rows <= set(mtl_optax.__all__), sorted(rows - set(mtl_optax.__all__))


def test_pages_reference_only_public_names():
  for page in DOCS.glob("*.md"):
    for name in re.findall(r"\{func\}`~?mtl_optax\.(\w+)`", page.read_text()):
      assert name in mtl_optax.__all__, f"{page.name}: mtl_optax.{name}"


# Methods whose docstring does not display its update yet (constant: an
# alias of linear_scalarization with given weights).
_MATH_PENDING = {"random_weighting", "random_loss_weighting", "constant"}


def test_every_method_displays_its_update():
  """Each method's page renders its update (a ``.. math::`` directive)."""
  missing = sorted(
      name for name in _factories() - _MATH_PENDING
      if not getattr(mtl_optax, name).__doc__.lstrip().startswith("Deprecated")
      and ".. math::" not in getattr(mtl_optax, name).__doc__)
  assert not missing, missing
