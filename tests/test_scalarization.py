"""COSMOS and PBI against TorchJD 0.18's scalarizers (recorded values)."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo

DATA = json.loads((pathlib.Path(__file__).parent / "data" /
                   "official_new_methods.json").read_text())


def _weights(tx, losses):
  return np.asarray(tx.loss_weights(tx.init(jnp.zeros(1)), losses))


@pytest.mark.parametrize("record", DATA["cosmos"], ids=lambda r: str(len(r["pref"])))
def test_cosmos_matches_torchjd(record):
  with jax.enable_x64(True):
    k = len(record["pref"])
    tx = mo.cosmos(k, lambda_=record["lambda_"], pref_vector=record["pref"])
    c = _weights(tx, jnp.asarray(record["losses"], jnp.float64))
  np.testing.assert_allclose(c, record["grad"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("record", DATA["pbi"], ids=lambda r: str(len(r["pref"])))
def test_pbi_matches_torchjd_up_to_its_scale(record):
  with jax.enable_x64(True):
    k = len(record["pref"])
    tx = mo.pbi(k, theta=record["theta"], pref_vector=record["pref"],
                reference=record["reference"])
    c = _weights(tx, jnp.asarray(record["losses"], jnp.float64))
  pref = np.asarray(record["pref"])
  scale = pref.sum() / np.linalg.norm(pref)   # ||w||_1 / ||w||_2
  np.testing.assert_allclose(c * scale, record["grad"], rtol=1e-9, atol=1e-12)


def test_cosmos_special_cases():
  losses = jnp.array([1.0, 2.0, 0.5])
  # lambda = 0: the linear scalarisation by r; default r = 1/K -> g0.
  np.testing.assert_allclose(_weights(mo.cosmos(3, lambda_=0.0), losses),
                             np.full(3, 1 / 3), rtol=1e-6)
  # Losses on the preference ray: the cosine term has zero gradient.
  r = np.array([0.5, 0.3, 0.2])
  np.testing.assert_allclose(
      _weights(mo.cosmos(3, lambda_=3.0, pref_vector=r), jnp.asarray(4 * r)),
      r, rtol=1e-5, atol=1e-6)
  # Huge and tiny losses stay finite (the cosine is scale-invariant).
  for scale in (1e30, 1e-30):
    c = _weights(mo.cosmos(3, lambda_=1.0), losses * scale)
    assert np.all(np.isfinite(c))


def test_cosmos_gradient_is_the_scalar_functions():
  r = jnp.array([0.2, 0.5, 0.3])
  losses = jnp.array([1.0, 2.0, 0.5])
  s = lambda l: r @ l - 2.0 * (r @ l) / (jnp.linalg.norm(r) * jnp.linalg.norm(l))
  np.testing.assert_allclose(
      _weights(mo.cosmos(3, lambda_=2.0, pref_vector=r), losses),
      jax.grad(s)(losses), rtol=1e-5)


def test_pbi_special_cases():
  # theta = 0: the projection w / sum(w) for any losses.
  w = np.array([1.0, 3.0])
  np.testing.assert_allclose(
      _weights(mo.pbi(2, theta=0.0, pref_vector=w), jnp.array([5.0, 1.0])),
      w / w.sum(), rtol=1e-6)
  # On the axis-aligned ray the penalty's gradient is exactly zero.
  np.testing.assert_allclose(
      _weights(mo.pbi(2, theta=5.0, pref_vector=[1.0, 0.0]),
               jnp.array([2.0, 0.0])), [1.0, 0.0], atol=1e-6)
  for scale in (1e30, 1e-30):
    c = _weights(mo.pbi(3, theta=5.0), jnp.array([1.0, 2.0, 0.5]) * scale)
    assert np.all(np.isfinite(c))


def test_single_backward_path_equals_stacked_path():
  tx = mo.pbi(2, theta=2.0, pref_vector=[0.3, 0.7])
  losses_fn = lambda p: jnp.stack([jnp.sum(p ** 2), jnp.sum((p - 1) ** 2)])
  params = jnp.array([0.3, -0.2])
  state = tx.init(params)
  losses, grad = mo.value_and_weighted_grad(losses_fn, tx)(state, params)
  stacked = mo.value_and_task_grads(losses_fn)(params)[1]
  u1, s1 = tx.update(grad, state, params, task_losses=losses)
  u2, s2 = tx.update(stacked, state, params, task_losses=losses)
  np.testing.assert_allclose(u1, u2, rtol=1e-5)
  np.testing.assert_allclose(s1.weights, s2.weights, rtol=1e-6)


def test_bad_shapes_are_clear_errors():
  with pytest.raises(ValueError, match="pref_vector"):
    mo.cosmos(3, pref_vector=[1.0, 2.0])
  with pytest.raises(ValueError, match="reference"):
    mo.pbi(3, reference=[0.0])
  with pytest.raises(ValueError, match="lambda_"):
    mo.cosmos(2, lambda_=-1.0)
