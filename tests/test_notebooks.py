"""Every notebook runs top to bottom in quick mode (``MTL_OPTAX_QUICK=1``).

Each notebook is read, executed in memory by ``nbclient`` (kernel
``python3``, working directory ``notebooks/`` so that ``_common`` and
``../tests/data`` resolve) and the executed copy is written to a temporary
directory: the committed files, whose outputs come from full-mode runs, are
never rewritten.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
# The Multi-digits notebooks build their data from scikit-learn's bundled
# digits (no download).
NEEDS_SKLEARN = {"02_multi_digit.ipynb", "03_transference.ipynb",
                 "04_marigold.ipynb"}


def test_every_notebook_is_collected():
  assert NOTEBOOKS == ["01_cagrad_toy.ipynb", "02_multi_digit.ipynb",
                       "03_transference.ipynb", "04_marigold.ipynb"]


def test_committed_notebooks_hold_full_mode_outputs():
  for name in NOTEBOOKS:
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") is not None for c in code)
    text = "".join(o.get("text", "") for c in code for o in c.outputs
                   if o.get("output_type") == "stream")
    assert "full mode" in text and "quick mode" not in text, name
    assert not any(o.get("output_type") == "error" for c in code
                   for o in c.outputs), name
    # No tracebacks printed to a stream (IPython's fallback when formatting an
    # exception fails) and no absolute paths of the machine that ran them.
    assert "Traceback (most recent call last)" not in text, name
    outputs = nbformat.writes(nb)
    for marker in ("/root/", "/home/", "/Users/", "/tmp/ipykernel"):
      assert marker not in outputs, (name, marker)
    assert (NOTEBOOKS_DIR / name).stat().st_size < 1_500_000, name


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_quick_mode(name, tmp_path, monkeypatch):
  if name in NEEDS_SKLEARN and importlib.util.find_spec("sklearn") is None:
    pytest.skip("scikit-learn is not installed (the notebooks extra)")
  monkeypatch.setenv("MTL_OPTAX_QUICK", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # Quick mode is compile-bound: trade XLA's CPU optimisation for compile time.
  flags = os.environ.get("XLA_FLAGS", "")
  monkeypatch.setenv("XLA_FLAGS",
                     (flags + " --xla_backend_optimization_level=0").strip())
  nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, tmp_path / name)
  stdout = "".join(o.get("text", "") for c in nb.cells
                   if c.cell_type == "code" for o in c.outputs
                   if o.get("output_type") == "stream")
  assert "quick mode" in stdout
  assert "notebook run time" in stdout
