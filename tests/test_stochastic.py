"""ExcessMTL, SDMGrad, MoDo and MoCo against float64 NumPy oracles.

Every oracle re-implements the update rule directly on the flattened
Jacobian(s), over several steps, so the state (AdaGrad accumulators, warm
starts, tracked gradients, step counters) is checked too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from tests.cases.aggregators_other import adversarial_jacobians

NAMES = ["random", "near_colinear", "rank_deficient", "one_zero", "k1", "k64"]


@functools.lru_cache(maxsize=None)
def _jitted(factory, num_tasks, **kwargs):
  tx = factory(num_tasks, **kwargs)
  return tx, jax.jit(tx.update)


def _sequence(jac, steps=3, seed=0):
  """``steps`` Jacobians around ``jac``, with a changing scale per task."""
  rng = np.random.default_rng(seed)
  out = [jac]
  for k in range(1, steps):
    scales = rng.uniform(0.5, 2.0, size=(len(jac), 1))
    out.append(jac * scales + 0.2 * (jac != 0).any(1, keepdims=True)
               * rng.normal(size=jac.shape))
  return out


def _project(v):
  """Euclidean projection onto the simplex (Duchi et al., 2008)."""
  u = np.sort(v)[::-1]
  css = np.cumsum(u) - 1.0
  rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
  return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def _run(factory, jacs, seconds=None, dtype=jnp.float32, losses=None,
         **kwargs):
  """The method over a sequence; returns [(update, state), ...]."""
  num_tasks = jacs[0].shape[0]
  tx, step = _jitted(factory, num_tasks, **kwargs)
  state = tx.init(jnp.zeros(jacs[0].shape[1:], dtype))
  out = []
  for k, jac in enumerate(jacs):
    extras = {}
    if seconds is not None:
      extras["second_task_grads"] = jnp.asarray(seconds[k], dtype)
    if losses is not None:
      extras["task_losses"] = jnp.asarray(losses[k], dtype)
    update, state = step(jnp.asarray(jac, dtype), state, **extras)
    out.append((np.asarray(update, np.float64), state))
  return out


# ----------------------------------------------------------------- ExcessMTL


def _excess_oracle(jacs, eta, warmup):
  """He et al. (2024), eqs. 6-9, as the official code: AdaGrad-diagonal
  excess risks, a warm-up baseline, exponentiated-gradient weights (here on
  the simplex; the official code's weights are K times these)."""
  num_tasks = jacs[0].shape[0]
  sum_sq = np.zeros_like(jacs[0])
  weights = np.full(num_tasks, 1.0 / num_tasks)
  baseline = np.zeros(num_tasks)
  out = []
  for step, jac in enumerate(jacs):
    sum_sq = sum_sq + jac**2
    root = np.sqrt(sum_sq)
    excess = np.where(root > 0, jac**2 / np.where(root > 0, root, 1), 0).sum(1)
    if step < warmup:
      baseline += excess
    else:
      mean = baseline / warmup
      relative = np.where(mean > 0, excess / np.where(mean > 0, mean, 1), 0)
      weights = weights * np.exp(eta * relative)
      weights = weights / weights.sum()
    out.append((weights @ jac, weights.copy(), root))
  return out


@pytest.mark.parametrize("name", NAMES)
def test_excess_mtl_matches_oracle_over_steps(name):
  jacs = _sequence(adversarial_jacobians()[name], steps=4)
  for warmup in (1, 2):
    expected = _excess_oracle(jacs, 0.7, warmup)
    ours = _run(mo.excess_mtl, jacs, robust_step_size=0.7,
                warmup_steps=warmup)
    for (update, state), (d, w, root) in zip(ours, expected):
      np.testing.assert_allclose(state.weights, w, rtol=2e-5, atol=1e-7)
      np.testing.assert_allclose(update, d, rtol=2e-5, atol=2e-5)
      np.testing.assert_allclose(state.root_sum_sq, root, rtol=1e-5,
                                 atol=1e-7)
    assert int(state.count) == len(jacs)
  if name == "random":  # the weights moved off uniform after the warm-up
    assert np.ptp(ours[-1][1].weights) > 1e-3


def test_excess_mtl_float64_trees_and_scale_invariance():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    jacs = [rng.normal(size=(3, 8)) for _ in range(3)]
    expected = _excess_oracle(jacs, 0.5, 1)
    ours = _run(mo.excess_mtl, jacs, dtype=jnp.float64, robust_step_size=0.5)
    for (update, state), (d, w, _) in zip(ours, expected):
      np.testing.assert_allclose(state.weights, w, rtol=1e-12)
      np.testing.assert_allclose(update, d, rtol=1e-12, atol=1e-14)
  # Trees: the per-leaf accumulators give the flat answer.
  tx = mo.excess_mtl(3, robust_step_size=0.5)
  state = tx.init({"a": jnp.zeros((2, 2)), "b": jnp.zeros(4)})
  step = jax.jit(tx.update)
  for jac, (_, w, _) in zip(jacs, expected):
    tree = {"a": jnp.asarray(jac[:, :4].reshape(3, 2, 2), jnp.float32),
            "b": jnp.asarray(jac[:, 4:], jnp.float32)}
    _, state = step(tree, state)
    np.testing.assert_allclose(state.weights, w, rtol=2e-5)
  # Excess-risk ratios are scale-free: 1e-30 and 1e30 give the same weights.
  for scale in (1e-30, 1e30):
    scaled = _run(mo.excess_mtl, [j * scale for j in jacs],
                  robust_step_size=0.5)
    np.testing.assert_allclose(scaled[-1][1].weights, expected[-1][1],
                               rtol=1e-4)
  with pytest.raises(ValueError, match="warmup_steps"):
    mo.excess_mtl(3, warmup_steps=0)
  with pytest.raises(ValueError, match="robust_step_size"):
    mo.excess_mtl(3, robust_step_size=-1.0)


# ------------------------------------------------------------- SDMGrad, MoDo


def test_excess_mtl_gradients_near_the_largest_float_keep_a_finite_state():
  """Gradients at 30-90% of float32's largest value: the AdaGrad root, the
  excess-risk sums and the baseline pass the range; they saturate at its
  largest value instead of turning the state (and every later step) inf."""
  rng = np.random.default_rng(4)
  top = np.finfo(np.float32).max
  jacs = [rng.choice([-1.0, 1.0], (3, 6)) * rng.uniform(0.3, 0.9, (3, 6))
          * top for _ in range(4)]
  for warmup in (1, 2):
    ours = _run(mo.excess_mtl, jacs, robust_step_size=0.5,
                warmup_steps=warmup)
    for update, state in ours:
      assert np.all(np.isfinite(update))
      for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
      np.testing.assert_allclose(float(np.sum(state.weights)), 1.0,
                                 rtol=1e-6)
    assert int(ours[-1][1].count) == len(jacs)
    # Saturated, every estimate equals the baseline: the weights stay put.
    np.testing.assert_allclose(ours[-1][1].weights, np.full(3, 1 / 3),
                               rtol=1e-6)


def _sdmgrad_oracle(jacs, seconds, lam, lr, momentum, iters):
  """Xiao et al. (2023) as the official code / LibMTL: normalised cross
  matrix, projected heavy-ball SGD on w, d = (g_w + lam g0) / (1 + lam)."""
  num_tasks = jacs[0].shape[0]
  w = np.full(num_tasks, 1.0 / num_tasks)
  out = []
  for jac, second in zip(jacs, seconds):
    matrix = jac @ second.T
    scale = np.mean(np.sqrt(np.maximum(np.diag(matrix), 0)))
    matrix = matrix / scale**2
    velocity = np.zeros(num_tasks)
    for _ in range(iters):
      velocity = momentum * velocity + matrix @ w + lam * matrix.mean(1)
      w = _project(w - lr * velocity)
    weights = (w + lam / num_tasks) / (1 + lam)
    out.append((weights @ jac, weights, w.copy()))
  return out


def _modo_oracle(jacs, seconds, gamma, rho):
  """Chen et al. (2023):
  lambda <- Proj(lambda - gamma (J1 J2^T + rho I) lambda), d = J1^T lambda."""
  num_tasks = jacs[0].shape[0]
  lam = np.full(num_tasks, 1.0 / num_tasks)
  out = []
  for jac, second in zip(jacs, seconds):
    lam = _project(lam - gamma * (jac @ (second.T @ lam) + rho * lam))
    out.append((lam @ jac, lam.copy()))
  return out


def _second_batches(jacs, seed=5):
  rng = np.random.default_rng(seed)
  return [j + 0.3 * rng.normal(size=j.shape) * np.linalg.norm(j, axis=1,
                                                              keepdims=True)
          / np.sqrt(j.shape[1]) for j in jacs]


@pytest.mark.parametrize("name", NAMES)
def test_sdmgrad_matches_oracle_with_two_batches(name):
  """float64 (LibMTL's inner step lr = 5 makes w jump between vertices, so
  rounding would decide them in float32) plus a float32 run at lr = 0.5."""
  jac = adversarial_jacobians()[name]
  jacs = _sequence(jac, steps=3)
  seconds = _second_batches(jacs)
  with jax.enable_x64(True):
    expected = _sdmgrad_oracle(jacs, seconds, 0.3, 5.0, 0.5, 20)
    ours = _run(mo.sdmgrad, jacs, seconds, jnp.float64, lam=0.3, learning_rate=5.0)
    for (update, state), (d, weights, w) in zip(ours, expected):
      np.testing.assert_allclose(state.simplex_weights, w, atol=1e-9)
      np.testing.assert_allclose(state.weights, weights, atol=1e-9)
      np.testing.assert_allclose(update, d, rtol=1e-8, atol=1e-9)
  expected = _sdmgrad_oracle(jacs, seconds, 0.3, 0.5, 0.5, 20)
  ours = _run(mo.sdmgrad, jacs, seconds, lam=0.3, learning_rate=0.5)
  for (update, state), (d, weights, _) in zip(ours, expected):
    np.testing.assert_allclose(state.weights, weights, atol=2e-5)
    np.testing.assert_allclose(update, d, rtol=1e-4, atol=2e-5)


def test_sdmgrad_single_batch_fallback_special_cases_and_scale():
  rng = np.random.default_rng(6)
  jacs = [rng.normal(size=(3, 10)) + 0.3 for _ in range(2)]
  # Without second_task_grads the matrix is J J^T.
  expected = _sdmgrad_oracle(jacs, jacs, 0.3, 0.5, 0.5, 20)
  ours = _run(mo.sdmgrad, jacs, lam=0.3, learning_rate=0.5)
  for (update, state), (d, weights, _) in zip(ours, expected):
    np.testing.assert_allclose(state.weights, weights, atol=2e-5)
    np.testing.assert_allclose(update, d, rtol=1e-4, atol=2e-5)
  # Large lam: the mean gradient; the weights are scale-free (1e-30, 1e30).
  (update, _), = _run(mo.sdmgrad, jacs[:1], lam=1e6)
  np.testing.assert_allclose(update, jacs[0].mean(0), rtol=1e-4, atol=1e-5)
  for scale in (1e-30, 1e30):
    (_, state), = _run(mo.sdmgrad, [jacs[0] * scale], lam=0.3, learning_rate=0.5)
    np.testing.assert_allclose(state.weights, expected[0][1], atol=2e-5)
  # A cross matrix with no positive diagonal: divided by max |A_ij| instead.
  jac = np.array([[1.0, 0.0], [0.0, 1.0]])
  second = np.array([[-1.0, 0.5], [0.5, -1.0]])
  (_, state), = _run(mo.sdmgrad, [jac], [second], lam=0.3, learning_rate=0.5)
  matrix = jac @ second.T / 1.0
  w = np.full(2, 0.5)
  velocity = np.zeros(2)
  for _ in range(20):
    velocity = 0.5 * velocity + matrix @ w + 0.3 * matrix.mean(1)
    w = _project(w - 0.5 * velocity)
  np.testing.assert_allclose(state.simplex_weights, w, atol=1e-6)
  with pytest.raises(ValueError, match="momentum"):
    mo.sdmgrad(3, momentum=1.0)


@pytest.mark.parametrize("name", NAMES)
def test_modo_matches_oracle_with_two_batches(name):
  jacs = _sequence(adversarial_jacobians()[name], steps=4)
  seconds = _second_batches(jacs)
  expected = _modo_oracle(jacs, seconds, 0.05, 0.1)
  ours = _run(mo.modo, jacs, seconds, learning_rate=0.05, rho=0.1)
  for (update, state), (d, lam) in zip(ours, expected):
    np.testing.assert_allclose(state.weights, lam, atol=2e-5)
    np.testing.assert_allclose(update, d, rtol=1e-4, atol=5e-5)
  if name == "random":
    assert np.ptp(ours[-1][1].weights) > 1e-2


def test_modo_fallback_tree_partition_and_overflow():
  rng = np.random.default_rng(7)
  jacs = [rng.normal(size=(3, 6)) for _ in range(3)]
  with jax.enable_x64(True):
    expected = _modo_oracle(jacs, jacs, 1e-3, 0.1)  # LibMTL's defaults
    ours = _run(mo.modo, jacs, dtype=jnp.float64)
    for (update, state), (d, lam) in zip(ours, expected):
      np.testing.assert_allclose(state.weights, lam, rtol=1e-12)
      np.testing.assert_allclose(update, d, rtol=1e-12)
  # Inside optax.partition the whole second batch arrives: it is masked like
  # the updates.
  seconds = _second_batches(jacs)
  grads = {"shared": jnp.asarray(jacs[0], jnp.float32),
           "head": jnp.asarray(jacs[1], jnp.float32)}
  second = {"shared": jnp.asarray(seconds[0], jnp.float32),
            "head": jnp.asarray(seconds[1], jnp.float32)}
  tx = optax.partition({"m": mo.modo(3, learning_rate=0.05), "h": mo.task_sum(3)},
                       {"shared": "m", "head": "h"})
  update, _ = jax.jit(tx.update)(
      grads, tx.init(jax.tree.map(lambda g: g[0], grads)),
      second_task_grads=second)
  np.testing.assert_allclose(
      update["shared"], _modo_oracle(jacs[:1], seconds[:1], 0.05, 0.1)[0][0],
      rtol=1e-4, atol=1e-5)
  # lr ||g||^2 overflows float32: the capped step gives the vertex limit.
  big = np.array([[1.0, 0.0], [0.0, 3.0]]) * 1e30
  (update, state), = _run(mo.modo, [big], learning_rate=1.0)
  np.testing.assert_allclose(state.weights, [1.0, 0.0])
  np.testing.assert_allclose(update, [1e30, 0.0], rtol=1e-6)
  with pytest.raises(ValueError, match="same tree"):
    mo.modo(3).update(grads, mo.modo(3).init(jax.tree.map(lambda g: g[0],
                                                          grads)),
                      second_task_grads=second["shared"])
  with pytest.raises(ValueError, match="second_task_grads.*num_tasks=3"):
    mo.modo(3).update(grads["shared"], mo.modo(3).init(jnp.zeros(6)),
                      second_task_grads=jnp.zeros((2, 6)))


# ---------------------------------------------------------------------- MoCo


def _moco_oracle(jacs, losses, beta, beta_sigma, gamma, gamma_sigma, rho):
  """The authors' code as shipped by LibMTL: loss-rescaled unit gradients,
  tracked by y, softmax step on lambda, d = Y^T lambda."""
  num_tasks = jacs[0].shape[0]
  tracked = np.zeros_like(jacs[0])
  lam = np.full(num_tasks, 1.0 / num_tasks)
  out = []
  for step, (jac, loss) in enumerate(zip(jacs, losses), start=1):
    norms = np.linalg.norm(jac, axis=1, keepdims=True)
    target = np.where(norms > 0, jac / np.where(norms > 0, norms, 1), 0) * (
        loss[:, None])
    tracked = tracked - beta / step**beta_sigma * (tracked - target)
    logits = lam - gamma / step**gamma_sigma * (
        tracked @ tracked.T + rho * np.eye(num_tasks)) @ lam
    lam = np.exp(logits - logits.max())
    lam = lam / lam.sum()
    out.append((lam @ tracked, lam.copy(), tracked.copy()))
  return out


def _moco_kwargs(beta, beta_sigma, gamma, gamma_sigma, rho):
  """The oracle's (LibMTL's) hyper-parameters in the factory's names."""
  return dict(decay=1 - beta, decay_sigma=beta_sigma, learning_rate=gamma,
              learning_rate_sigma=gamma_sigma, rho=rho)


@pytest.mark.parametrize("name", NAMES)
def test_moco_matches_oracle_over_steps(name):
  jacs = _sequence(adversarial_jacobians()[name], steps=4)
  rng = np.random.default_rng(8)
  losses = [rng.uniform(0.5, 3.0, size=len(jacs[0])) for _ in jacs]
  hyper = dict(beta=0.5, beta_sigma=0.5, gamma=0.3, gamma_sigma=0.5, rho=0.1)
  expected = _moco_oracle(jacs, losses, **hyper)
  ours = _run(mo.moco, jacs, losses=losses, **_moco_kwargs(**hyper))
  for (update, state), (d, lam, tracked) in zip(ours, expected):
    np.testing.assert_allclose(state.tracked, tracked, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.weights, lam, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(update, d, rtol=1e-5, atol=1e-5)
  assert int(state.count) == len(jacs)


def test_moco_float64_tree_scale_and_errors():
  rng = np.random.default_rng(9)
  jacs = [rng.normal(size=(2, 6)) for _ in range(3)]
  losses = [np.array([1.0, 2.0]), np.array([0.8, 2.5]), np.array([0.5, 3.0])]
  hyper = dict(beta=0.5, beta_sigma=0.5, gamma=0.1, gamma_sigma=0.5, rho=0.0)
  with jax.enable_x64(True):
    expected = _moco_oracle(jacs, losses, **hyper)
    ours = _run(mo.moco, jacs, dtype=jnp.float64, losses=losses)  # defaults
    for (update, state), (d, lam, _) in zip(ours, expected):
      np.testing.assert_allclose(state.weights, lam, rtol=1e-12)
      np.testing.assert_allclose(update, d, rtol=1e-12)
  # Gradient scale does not matter (each is rescaled to its loss).
  for scale in (1e-30, 1e30):
    ((update, _),) = _run(mo.moco, [jacs[0] * scale], losses=losses[:1])
    np.testing.assert_allclose(update, expected[0][0], rtol=1e-5)
  # Trees: tracked gradients per leaf.
  tx = mo.moco(2)
  state = tx.init({"a": jnp.zeros((2, 2)), "b": jnp.zeros(2)})
  step = jax.jit(tx.update)
  for jac, loss in zip(jacs, losses):
    tree = {"a": jnp.asarray(jac[:, :4].reshape(2, 2, 2), jnp.float32),
            "b": jnp.asarray(jac[:, 4:], jnp.float32)}
    update, state = step(tree, state, task_losses=jnp.asarray(loss))
  np.testing.assert_allclose(
      np.concatenate([np.ravel(update["a"]), update["b"]]), expected[-1][0],
      rtol=1e-5)
  with pytest.raises(ValueError, match="task_losses"):
    tx.update(tree, state)


def test_sdmgrad_under_x64_with_float32_gradients_keeps_float32():
  with jax.enable_x64(True):
    grads = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)),
                        jnp.float32)
    for tx in (mo.sdmgrad(3), mo.modo(3), mo.mgda(3), mo.cagrad(3)):
      update, state = jax.jit(tx.update)(grads, tx.init(jnp.zeros(4,
                                                                 jnp.float32)))
      assert update.dtype == jnp.float32
      assert state.weights.dtype == jnp.float32


def test_sdmgrad_default_is_the_same_under_jit_eager_and_vmap():
  rng = np.random.default_rng(11)
  gs = [jnp.asarray(rng.normal(size=(3, 15)), jnp.float32) for _ in range(3)]
  tx = mo.sdmgrad(3)
  p = jnp.zeros(15)

  def run(step):
    state = tx.init(p)
    for g in gs:
      update, state = step(g, state)
    return update, state.weights

  eager = run(lambda g, s: tx.update(g, s, p))
  jitted = run(jax.jit(lambda g, s: tx.update(g, s, p)))
  for a, b in zip(eager, jitted):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  batch = jnp.stack(gs)
  states = jax.vmap(tx.init)(jnp.zeros((3, 15)))
  vmapped, _ = jax.vmap(lambda g, s: tx.update(g, s))(batch, states)
  for i, g in enumerate(gs):
    looped, _ = tx.update(g, tx.init(p))
    np.testing.assert_allclose(vmapped[i], looped, rtol=1e-4, atol=1e-6)
  # The default step contracts: the weights solve the inner problem
  # (w + lam/K)/(1 + lam) with w = argmin ||J^T (w + lam/K)||^2 on the simplex,
  # checked against a fine grid.
  a = np.asarray(gs[0] @ gs[0].T, np.float64)
  grid = np.stack(np.meshgrid(*[np.linspace(0, 1, 201)] * 2), -1).reshape(-1, 2)
  grid = np.concatenate([grid, 1 - grid.sum(1, keepdims=True)], 1)
  grid = grid[grid[:, 2] >= 0]
  shifted = grid + 0.3 / 3
  best = grid[np.argmin(np.einsum("ni,ij,nj->n", shifted, a, shifted))]
  _, state = tx.update(gs[0], tx.init(p))
  np.testing.assert_allclose(state.simplex_weights, best, atol=0.02)


def test_moco_tiny_gradient_with_a_large_loss_is_finite():
  tx = mo.moco(3)
  grads = jnp.array([[0.0, 0.0], [0.0, 0.0], [1e-27, 0.0]])
  update, state = tx.update(grads, tx.init(jnp.zeros(2)),
                            task_losses=jnp.array([0.0, 0.0, 1e12]))
  assert np.all(np.isfinite(update))
  # h_3 = L_3 g_3 / ||g_3|| = (1e12, 0); tracked y = beta_1 h = 0.5 h.
  np.testing.assert_allclose(state.tracked[2], [5e11, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(state.tracked[:2], 0.0)


def test_old_spellings_warn_and_convert():
  jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
  losses = jnp.array([1., 2.])
  pairs = [
      (mo.sdmgrad, dict(lr=0.5, num_iters=7),
       dict(learning_rate=0.5, max_iter=7), {}),
      (mo.modo, dict(gamma=0.05), dict(learning_rate=0.05), {}),
      (mo.moco, dict(beta=0.25, beta_sigma=0.3, gamma=0.2, gamma_sigma=0.4),
       dict(decay=0.75, decay_sigma=0.3, learning_rate=0.2,
            learning_rate_sigma=0.4), dict(task_losses=losses)),
  ]
  for factory, old, new, extra in pairs:
    with pytest.warns(DeprecationWarning):
      tx_old = factory(2, **old)
    tx_new = factory(2, **new)
    for _ in range(2):  # moco's schedule and tracking over two steps
      u_old, s_old = tx_old.update(jac, tx_old.init(jnp.zeros(3)), **extra)
      u_new, s_new = tx_new.update(jac, tx_new.init(jnp.zeros(3)), **extra)
    np.testing.assert_array_equal(u_old, u_new)
