"""The Gram-weighting layer on K x K inputs: the papers' properties.

In the style of TorchJD's shared asserts, every function is checked on
sampled Gram matrices directly (no pytrees): permutation equivariance,
behaviour under scaling the Gram matrix from 1e-30 to 1e30, non-conflict of
the dual-cone projections, MGDA's optimality conditions, CAGrad's dual
identity, and ``weights @ J`` against the optax factory's update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax import gram_weightings as gw



@dataclasses.dataclass(frozen=True)
class Spec:
  """One layer function with the matching factory call.

  ``scale_power``: the weights of ``s G`` are ``s**scale_power`` times those
  of ``G``.
  """
  name: str
  fn: Callable[..., gw.GramWeights]
  factory: Callable[..., Any]
  kwargs: dict = dataclasses.field(default_factory=dict)
  factory_kwargs: dict | None = None
  equivariant: bool = True
  scale_power: float = 0.0
  min_tasks: int = 1

  def layer(self, gram, state=None):
    return self.fn(gram, state, **self.kwargs)

  def make(self, num_tasks):
    kwargs = self.kwargs if self.factory_kwargs is None else self.factory_kwargs
    return self.factory(num_tasks, **kwargs)

  def __str__(self):
    return self.name


SPECS = [
    Spec("mgda", gw.mgda, mo.mgda, {"tol": 1e-7}),
    Spec("cagrad", gw.cagrad, mo.cagrad, {"c": 0.4}),
    Spec("cagrad_fast", gw.cagrad, mo.cagrad,
         {"c": 0.5, "num_sampled_tasks": 2, "seed": 3}, equivariant=False,
         min_tasks=3),
    Spec("upgrad", gw.upgrad, mo.upgrad),
    Spec("dualproj", gw.dualproj, mo.dualproj),
    Spec("imtl_g", gw.imtl_g, mo.imtl_g),
    Spec("aligned_mtl", gw.aligned_mtl, mo.aligned_mtl),
    Spec("config", gw.config, mo.config),
    Spec("nash_mtl", gw.nash_mtl, mo.nash_mtl,
         {"max_norm": 0.0, "max_iter": 20},
         {"max_norm": 0.0, "max_iter": 20}, scale_power=-0.5),
    Spec("nash_mtl_every2", gw.nash_mtl, mo.nash_mtl,
         {"update_every": 2, "max_iter": 20},
         {"update_every": 2, "max_iter": 20}, scale_power=-0.5),
    Spec("fairgrad", gw.fairgrad, mo.fairgrad, {"alpha": 1.0},
         scale_power=-0.5),
    Spec("fairgrad_alpha2", gw.fairgrad, mo.fairgrad, {"alpha": 2.0},
         scale_power=-2.0 / 3.0),
    Spec("krum", gw.krum, mo.krum, {"n_byzantine": 1, "n_selected": 2},
         min_tasks=4),
    Spec("pcgrad", gw.pcgrad, mo.pcgrad, {"seed": 5}, equivariant=False),
    Spec("gradvac", gw.gradvac, mo.gradvac, {"decay": 0.7, "seed": 5},
         equivariant=False),
    Spec("pcd", gw.pcd, mo.pcd, {"tau": 0.3, "decay": 0.9, "eps": 0.0},
         equivariant=False),
]
DETERMINISTIC = [s for s in SPECS if s.equivariant and s.name != "krum"]


@pytest.fixture(params=SPECS, ids=str)
def spec(request):
  return request.param


def _jacobian(seed, num_tasks, dim=6):
  rng = np.random.default_rng(seed)
  # A common component keeps the tasks from being Pareto-stationary, so that
  # Nash-MTL and FairGrad have a solution.
  return (rng.normal(size=(num_tasks, dim))
          + 1.5 * rng.normal(size=(1, dim))).astype(np.float32)


def _num_tasks(spec, default=4):
  return max(default, spec.min_tasks)


def test_weights_times_jacobian_is_the_factory_update(spec):
  """Two steps, states threaded through both paths: same weights, same
  update, same state."""
  num_tasks = _num_tasks(spec)
  tx = spec.make(num_tasks)
  state = tx.init(jnp.zeros(6))
  layer_state = None
  for step in range(2):
    jac = jnp.asarray(_jacobian(step, num_tasks))
    update, state = tx.update(jac, state)
    out = spec.layer(jac @ jac.T, layer_state)
    layer_state = out.state
    np.testing.assert_allclose(out.weights @ jac, update, rtol=2e-4,
                               atol=2e-5)
    np.testing.assert_allclose(out.weights, state.weights, rtol=2e-4,
                               atol=2e-5)
    np.testing.assert_allclose(out.state.weights, out.weights)
  for new, old in zip(jax.tree.leaves(layer_state), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(new, np.float64),
                               np.asarray(old, np.float64), rtol=2e-4,
                               atol=2e-5)


@pytest.mark.parametrize("spec", DETERMINISTIC, ids=str)
def test_permuting_tasks_permutes_weights(spec):
  jac = _jacobian(7, 4)
  gram = jac @ jac.T
  perm = np.array([2, 0, 3, 1])
  weights = spec.layer(jnp.asarray(gram)).weights
  permuted = spec.layer(jnp.asarray(gram[perm][:, perm])).weights
  np.testing.assert_allclose(np.asarray(weights)[perm], permuted, rtol=2e-3,
                             atol=2e-4)


def test_krum_is_permutation_equivariant_without_ties():
  spec = next(s for s in SPECS if s.name == "krum")
  jac = _jacobian(8, 5)
  jac[3] += 40.0  # an outlier
  gram = jac @ jac.T
  perm = np.array([4, 2, 0, 1, 3])
  weights = np.asarray(spec.layer(jnp.asarray(gram)).weights)
  permuted = spec.layer(jnp.asarray(gram[perm][:, perm])).weights
  np.testing.assert_array_equal(weights[perm], permuted)
  assert weights[3] == 0.0


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1e12, 1e30])
def test_scaling_the_gram_matrix(spec, scale):
  """``c(s G) = s**p c(G)``, with the method's documented power p; raw Gram
  matrices of 1e-30 and 1e30 in float32 are finite and exact."""
  num_tasks = _num_tasks(spec)
  jac = _jacobian(3, num_tasks)
  gram = (jac @ jac.T).astype(np.float64)
  reference = np.asarray(spec.layer(jnp.asarray(gram, jnp.float32)).weights,
                         np.float64)
  scaled = np.asarray(spec.layer(jnp.asarray(scale * gram,
                                             jnp.float32)).weights, np.float64)
  assert np.all(np.isfinite(scaled))
  np.testing.assert_allclose(scaled * scale ** -spec.scale_power, reference,
                             rtol=5e-4, atol=5e-5 * np.max(np.abs(reference)))


def test_normalized_input_equals_raw_input(spec):
  num_tasks = _num_tasks(spec)
  jac = jnp.asarray(_jacobian(4, num_tasks))
  gram = jac @ jac.T
  normalized = gw.normalize_gram(gram)
  np.testing.assert_allclose(spec.layer(normalized).weights,
                             spec.layer(gram).weights, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(normalized.gram * normalized.rms_norm ** 2, gram,
                             rtol=1e-5)
  np.testing.assert_allclose(np.trace(normalized.gram), num_tasks, rtol=1e-6)


def test_jit_matches_eager(spec):
  num_tasks = _num_tasks(spec)
  jac = jnp.asarray(_jacobian(5, num_tasks))
  eager = spec.layer(jac @ jac.T)
  jitted = jax.jit(spec.layer)(jac @ jac.T)
  np.testing.assert_allclose(jitted.weights, eager.weights, rtol=1e-4,
                             atol=1e-5)


def test_non_finite_gram_gives_nan_and_keeps_the_state(spec):
  num_tasks = _num_tasks(spec)
  jac = jnp.asarray(_jacobian(6, num_tasks))
  first = spec.layer(jac @ jac.T)
  bad = (jac @ jac.T).at[0, 1].set(jnp.nan)
  out = spec.layer(bad, first.state)
  assert np.all(np.isnan(out.weights))
  for new, old in zip(jax.tree.leaves(out.state._replace(weights=0.0)),
                      jax.tree.leaves(first.state._replace(weights=0.0))):
    np.testing.assert_array_equal(new, old)


def test_rejects_a_non_square_gram():
  with pytest.raises(ValueError, match="gram_weightings.mgda.*shape \\(2, 3\\)"):
    gw.mgda(jnp.ones((2, 3)))


@pytest.mark.parametrize("fn", [gw.upgrad, gw.dualproj])
@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=pytest.mark.slow),
                                  pytest.param(3, marks=pytest.mark.slow)])
def test_dual_cone_projections_conflict_with_no_task(fn, seed):
  """``<g_i, J^T c> = (G c)_i >= 0`` for every task (exact QP: reg_eps=0)."""
  rng = np.random.default_rng(seed)
  num_tasks = 2 + seed
  jac = rng.normal(size=(num_tasks, 5))
  gram = jac @ jac.T
  with jax.enable_x64(True):
    weights = np.asarray(fn(jnp.asarray(gram), reg_eps=0.0).weights)
  assert np.min(gram @ weights) >= -1e-8 * np.trace(gram)
  # Where no two gradients conflict the projection changes nothing.
  agreeing = np.abs(jac)
  weights = np.asarray(fn(jnp.asarray(agreeing @ agreeing.T),
                          reg_eps=0.0).weights)
  np.testing.assert_allclose(weights, np.full(num_tasks, 1.0 / num_tasks),
                             rtol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_mgda_satisfies_the_simplex_kkt_conditions(num_tasks):
  """w >= 0, sum w = 1, (G w)_i >= w^T G w with equality on the support."""
  rng = np.random.default_rng(num_tasks)
  jac = rng.normal(size=(num_tasks, 4))
  gram = jac @ jac.T
  with jax.enable_x64(True):
    w = np.asarray(gw.mgda(jnp.asarray(gram), tol=1e-12,
                           max_iter=5000).weights)
  value = w @ gram @ w
  scale = np.trace(gram)
  assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
  assert np.all(gram @ w >= value - 1e-8 * scale)
  np.testing.assert_allclose((gram @ w)[w > 1e-8], value, atol=1e-8 * scale)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_dual_identity(c):
  """min_i <g_i, d*> = F(w*) for the unscaled d* (rescale=0), and d* lies on
  the boundary of the ball ||d - g0|| <= c ||g0||."""
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    for num_tasks in (2, 5):
      jac = rng.normal(size=(num_tasks, 9)) + rng.normal(size=(1, 9))
      out = gw.cagrad(jnp.asarray(jac @ jac.T), c=c, rescale=0, tol=1e-12,
                      max_iter=5000)
      d = np.asarray(out.weights) @ jac
      g0 = jac.mean(0)
      g_w = np.asarray(out.state.dual_weights) @ jac
      dual = g_w @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(g_w)
      np.testing.assert_allclose(np.min(jac @ d), dual, rtol=1e-7)
      np.testing.assert_allclose(np.linalg.norm(d - g0),
                                 c * np.linalg.norm(g0), rtol=1e-7)


def test_state_carries_over_like_the_factory_for_gradvac_targets():
  """Given targets, GradVac's step is a pure function of (gram, state)."""
  jac = jnp.asarray(_jacobian(9, 3))
  targets = jnp.array([[0.0, 0.5, -0.2], [0.1, 0.0, 0.3], [0.4, 0.2, 0.0]])
  state = mo.GradVacState(jnp.zeros(3), targets, jax.random.PRNGKey(1))
  first = gw.gradvac(jac @ jac.T, state, decay=0.5)
  again = gw.gradvac(jac @ jac.T, state, decay=0.5)
  np.testing.assert_array_equal(first.weights, again.weights)
  assert not np.allclose(first.state.targets, targets)
  # Zero targets: GradVac's first step is PCGrad's for the same key.
  pcgrad = gw.pcgrad(jac @ jac.T, mo.PCGradState(jnp.zeros(3),
                                                 jax.random.PRNGKey(1)))
  zero = gw.gradvac(jac @ jac.T, state._replace(targets=jnp.zeros((3, 3))))
  np.testing.assert_allclose(zero.weights, pcgrad.weights, rtol=1e-6)
