"""Tests of mtl_optax._src.base: the shared builder's helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax._src import base


def _mixed_tree():
  rng = np.random.default_rng(3)
  return {
      "half": jnp.asarray(rng.normal(size=(3, 4, 5)) * 100, jnp.float16),
      "single": jnp.asarray(rng.normal(size=(3, 7)), jnp.float32),
      "scalar": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
      "empty": jnp.zeros((3, 0), jnp.float32),
  }


@pytest.mark.parametrize("jitted", [False, True])
def test_weighted_sum_in_range_caps_the_length_and_keeps_the_direction(
    jitted):
  tree = _mixed_tree()
  coeffs = jnp.array([3e4, -1e3, 5.0])     # the float16 sum passes 65504
  fn = jax.jit(base.weighted_sum_in_range) if jitted else (
      base.weighted_sum_in_range)
  out, ratio = fn(coeffs, tree)
  exact = {k: np.tensordot(np.asarray(coeffs, np.float64),
                           np.asarray(v, np.float64), axes=1)
           for k, v in tree.items()}
  r = float(ratio)
  # The cap: the float16 leaf ends at half its range, the largest leaf
  # fixes r, and every leaf is the exact sum times the same r.
  assert 0 < r < 1
  np.testing.assert_allclose(np.max(np.abs(exact["half"])) * r,
                             np.finfo(np.float16).max / 2, rtol=1e-6)
  for k, v in out.items():
    assert v.dtype == tree[k].dtype and v.shape == tree[k].shape[1:]
    np.testing.assert_allclose(np.asarray(v, np.float64), exact[k] * r,
                               rtol=2e-3 if k == "half" else 1e-5,
                               atol=1e-6 * np.max(np.abs(exact[k]), initial=1))
  # Nothing to cap: r = 1 and the plain sum.
  out, ratio = fn(jnp.array([0.5, 0.25, 0.25]), tree)
  assert float(ratio) == 1.0
  np.testing.assert_allclose(
      np.asarray(out["single"]),
      np.tensordot([0.5, 0.25, 0.25], np.asarray(tree["single"]), axes=1),
      rtol=1e-6)


@pytest.mark.parametrize("jitted", [False, True])
def test_weighted_sum_in_range_of_gradients_near_the_largest_float(jitted):
  """Each gradient near float32's largest value, their mean representable:
  the partial sums must not overflow on the way (they did when the
  coefficients were divided by their largest, making the sum K gradients)."""
  rng = np.random.default_rng(5)
  top = np.finfo(np.float32).max
  # Below half the range (where the cap starts), their sum beyond it.
  grads = rng.choice([-1.0, 1.0], (3, 6)) * rng.uniform(0.3, 0.45, (3, 6)) * top
  grads[:, 0] = 0.45 * top   # every task at the same sign: no cancellation
  tree = {"w": jnp.asarray(grads, jnp.float32)}
  fn = jax.jit(base.weighted_sum_in_range) if jitted else (
      base.weighted_sum_in_range)
  coeffs = jnp.full((3,), 1 / 3, jnp.float32)
  out, ratio = fn(coeffs, tree)
  assert float(ratio) == 1.0
  np.testing.assert_allclose(np.asarray(out["w"], np.float64),
                             np.asarray(tree["w"], np.float64).mean(axis=0),
                             rtol=1e-6)
  # Three times that (a sum of the three) passes the range: capped at half
  # of it, the direction kept.
  out, ratio = fn(3 * coeffs, tree)
  np.testing.assert_allclose(float(np.max(np.abs(out["w"]))), top / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(float(ratio) * 3, top / 2 / (0.45 * top),
                             rtol=1e-6)


@pytest.mark.parametrize("jitted", [False, True])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weighted_sum_in_range_propagates_non_finite_input(jitted, bad):
  tree = _mixed_tree()
  tree["single"] = tree["single"].at[1, 2].set(bad)
  fn = jax.jit(base.weighted_sum_in_range) if jitted else (
      base.weighted_sum_in_range)
  out, _ = fn(jnp.array([1.0, 2.0, 3.0]), tree)
  assert not np.all(np.isfinite(np.asarray(out["single"])))
  assert not bool(base.all_finite(out))
  # A non-finite coefficient poisons the update too.
  out, _ = fn(jnp.array([1.0, bad, 3.0]), _mixed_tree())
  assert not bool(base.all_finite(out))
