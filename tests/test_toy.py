"""The CAGrad 2-D toy: the paper's qualitative claims, as regression targets."""

import json

import jax
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax import toy
from mtl_optax.__main__ import PARETO_TOLERANCE
from mtl_optax.__main__ import expectation
from mtl_optax.__main__ import main


def test_toy_losses_at_known_points():
  np.testing.assert_allclose(toy.toy_losses(np.array([0.0, -8.3551])),
                             [-15.0916, -15.0916], atol=1e-3)
  # Task minima at (+-7, -8.3551) with value -19.989 for the task it minimises.
  np.testing.assert_allclose(toy.toy_losses(np.array([7.0, -8.3551]))[0],
                             -19.989, atol=1e-3)
  np.testing.assert_allclose(
      toy.toy_losses(np.array([0.0, -8.3551]), l1_scale=0.1)[0], -1.50916,
      atol=1e-4)


@pytest.fixture(scope="module")
def runs():
  return {
      "cagrad": toy.run_toy(mo.cagrad(2, c=0.5, rescale=2)),
      "mean": toy.run_toy(mo.linear_scalarization(2)),
  }


def test_cagrad_reaches_the_average_loss_optimum_from_every_start(runs):
  final = np.asarray(runs["cagrad"].final)
  np.testing.assert_allclose(final, np.tile(toy.L0_OPTIMUM, (6, 1)),
                             atol=1e-2)
  np.testing.assert_allclose(np.asarray(runs["cagrad"].final_losses).mean(1),
                             toy.L0_MIN, atol=1e-3)


def test_mean_gradient_is_stuck_from_three_starts(runs):
  l0 = np.asarray(runs["mean"].final_losses).mean(1)
  stuck = {start for start, value in zip(toy.TOY_STARTS, l0) if value > 0}
  assert stuck == {(-8.5, 7.5), (-8.5, 5.0), (9.0, 9.0)}
  # The reference end points of the stuck runs.
  final = np.asarray(runs["mean"].final)
  np.testing.assert_allclose(final[0], (-5.06, 2.17), atol=0.1)
  np.testing.assert_allclose(final[4], (5.04, 2.34), atol=0.1)


def test_mgda_and_pcgrad_end_on_the_pareto_set():
  for method in (mo.mgda(2), mo.pcgrad(2)):
    final = np.asarray(toy.run_toy(method).final)
    assert np.all(np.abs(final[:, 0]) <= 7.05)
    assert np.all((final[:, 1] < -8.3) & (final[:, 1] > -8.45))
    residuals = np.asarray(jax.vmap(toy.pareto_residual)(final))
    assert np.all(residuals < PARETO_TOLERANCE)


def test_pareto_residual_against_brute_force_min_norm():
  """``||d*|| / max ||g_i||`` with ``d*`` found on a fine grid of the hull
  (NumPy), at points on and off the Pareto set."""
  points = [(3.0, -8.3551), (3.0, 0.0), (-5.044, 2.164), (0.0, -8.3551),
            (8.0, -8.3551), (-8.5, 7.5)]
  ts = np.linspace(0.0, 1.0, 200_001)
  for point in points:
    theta = np.asarray(point, np.float32)
    jac = np.asarray(jax.jacrev(toy.toy_losses)(theta), np.float64)
    hull = ts[:, None] * jac[0] + (1 - ts[:, None]) * jac[1]
    expected = np.min(np.linalg.norm(hull, axis=1)) / np.max(
        np.linalg.norm(jac, axis=1))
    got = float(toy.pareto_residual(theta))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)
  assert float(toy.pareto_residual(np.array([0.0, -8.3551]))) < 1e-4
  assert float(toy.pareto_residual(np.array([3.0, 0.0]))) > 0.1


def test_expectations_name_the_three_stuck_starts():
  assert [expectation("mean gradient (Adam)", s) for s in toy.TOY_STARTS] == [
      "stuck", "optimum", "stuck", "optimum", "stuck", "optimum"]
  assert {expectation("MGDA", s) for s in toy.TOY_STARTS} == {"pareto"}
  assert {expectation("PCGrad", s) for s in toy.TOY_STARTS} == {"pareto"}
  assert {expectation("CAGrad (c=0.5)", s) for s in toy.TOY_STARTS} == {
      "optimum"}


def test_command_line_main_job_writes_plot_and_table(tmp_path, capsys):
  assert main(["toy", "--steps", "2000", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  # One progress line per method, then one table per method.
  for name in toy.default_methods():
    assert sum(line.strip().startswith(name) for line in out.splitlines()
               ) == 2, name
  assert "Pareto res." in out and "as expected" in out
  assert "reference end" not in out
  assert (tmp_path / "toy_trajectories.png").stat().st_size > 10_000
  table = json.loads((tmp_path / "toy_results.json").read_text())
  assert table["tolerances"]["pareto_residual"] == PARETO_TOLERANCE
  rows = table["results"]["CAGrad (c=0.5)"]
  assert len(rows) == 6 and {r["expected"] for r in rows} == {"optimum"}


def test_run_toy_takes_loss_weightings_and_shifted_losses():
  # A loss weighting runs on one weighted-loss gradient per step; the offset
  # moves the losses a method sees, never the gradients of a stacked method.
  starts = [(9.0, 9.0), (-7.5, -0.5)]
  kwargs = dict(starts=starts, num_steps=400, record_every=200, l1_scale=0.1)
  famo = toy.run_toy(mo.famo(2), loss_offset=(-2.1, -21.0), **kwargs)
  assert famo.trajectories.shape == (2, 3, 2)
  assert np.all(np.isfinite(famo.final))
  np.testing.assert_allclose(np.asarray(famo.final_weights).sum(1), 1.0,
                             rtol=1e-5)
  assert not np.allclose(famo.final_weights, 0.5)  # the weights moved
  plain = toy.run_toy(mo.mgda(2), **kwargs)
  shifted = toy.run_toy(mo.mgda(2), loss_offset=(-2.1, -21.0), **kwargs)
  np.testing.assert_array_equal(plain.final, shifted.final)
  # The reported losses are the toy's own, whatever the methods saw.
  np.testing.assert_allclose(
      famo.final_losses,
      np.stack([toy.toy_losses(np.asarray(p), 0.1) for p in famo.final]),
      rtol=1e-5, atol=1e-5)
