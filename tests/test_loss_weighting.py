"""Tests of the loss weightings against NumPy re-implementations.

Each method is run on a recorded sequence of task losses (and, where the rule
reads gradients, recorded per-task gradients) and compared step by step with
an oracle written here in NumPy from its paper / reference code. Stacked
gradients ``I_K`` (or ``diag(n)``) make ``update == c`` (``c * n``), so the
coefficients are read from the update itself as well as from
``loss_weights``.
"""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax.toy import NASH_MTL_STARTS, toy_losses

K = 3
T = 10


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _loss_sequence(seed=0, steps=T, num_tasks=K):
  """Positive losses of different scales drifting over ``steps`` steps."""
  rng = np.random.default_rng(seed)
  scales = np.array([1.0, 10.0, 0.1, 3.0, 0.5][:num_tasks])
  walk = np.cumsum(rng.normal(-0.05, 0.2, (steps, num_tasks)), axis=0)
  return (scales * np.exp(walk)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _scan(tx, losses, grads):
  """Runs ``tx`` over the sequence: per step (loss_weights, update, state);
  the state's weights stand in for loss_weights for stacked-only methods."""
  params = jnp.zeros(grads.shape[2:], grads.dtype)

  def step(state, xs):
    loss, grad = xs
    update, new_state = tx.update(grad, state, params, task_losses=loss)
    coeffs = (tx.loss_weights(state, loss) if hasattr(tx, "loss_weights")
              else new_state.weights)
    return new_state, (coeffs, update, new_state)

  _, out = jax.lax.scan(step, tx.init(params), (losses, grads))
  return out


def _run(tx, losses, grads=None):
  losses = jnp.asarray(losses)
  steps, num_tasks = losses.shape
  if grads is None:
    grads = jnp.broadcast_to(jnp.eye(num_tasks), (steps, num_tasks, num_tasks))
  return _scan(tx, losses, jnp.asarray(grads, jnp.float32))


def _close(a, b, rtol=2e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(a, np.float64),
                             np.asarray(b, np.float64), rtol=rtol, atol=atol)


class NpAdam:
  """``torch.optim.Adam`` in NumPy (float64); L2 weight decay on the grad."""

  def __init__(self, lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8):
    self.lr, self.wd, self.b1, self.b2, self.eps = lr, weight_decay, b1, b2, eps
    self.t, self.m, self.v = 0, 0.0, 0.0

  def step(self, p, g):
    g = g + self.wd * p
    self.t += 1
    self.m = self.b1 * self.m + (1 - self.b1) * g
    self.v = self.b2 * self.v + (1 - self.b2) * g * g
    m_hat = self.m / (1 - self.b1 ** self.t)
    v_hat = self.v / (1 - self.b2 ** self.t)
    return p - self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def _np_softmax(x):
  e = np.exp(x - np.max(x))
  return e / e.sum()


# ---------------------------------------------------------------------------
# Oracles, one per paper.
# ---------------------------------------------------------------------------


def test_uncertainty_weighting_matches_numpy_oracle():
  """Kendall et al.: min sum L/(2 e^s) + s/2 jointly; s by Adam from -0.5."""
  losses = _loss_sequence(1)
  tx = mo.uncertainty_weighting(K, learning_rate=0.05)
  coeffs, updates, states = _run(tx, losses)
  s, adam, expected = np.full(K, -0.5), NpAdam(0.05), []
  for loss in losses.astype(np.float64):
    c = 1.0 / (2.0 * np.exp(s))
    expected.append(c)
    s = adam.step(s, -loss / (2 * np.exp(s)) + 0.5)  # d/ds of the UW objective
  # The paper's weights, at the mean-gradient scale (1/K).
  expected = np.array(expected) / K
  _close(coeffs, expected)
  _close(updates, expected)
  _close(states.weights, expected)
  _close(states.log_scales[-1], s, rtol=1e-4, atol=2e-5)


def test_imtl_l_matches_numpy_oracle():
  """Liu et al. (IMTL-L): scaled loss e^s L - s, s from 0 by Adam."""
  losses = _loss_sequence(2)
  coeffs, updates, _ = _run(mo.imtl_l(K, learning_rate=0.05), losses)
  s, adam, expected = np.zeros(K), NpAdam(0.05), []
  for loss in losses.astype(np.float64):
    expected.append(np.exp(s))
    s = adam.step(s, np.exp(s) * loss - 1.0)
  expected = np.array(expected) / K  # the mean-gradient scale
  _close(coeffs, expected, rtol=1e-4)
  _close(updates, expected, rtol=1e-4)


def test_learned_scale_accepts_a_custom_optimizer():
  """optimizer=optax.sgd(lr) is the plain joint gradient step."""
  losses = _loss_sequence(3)
  coeffs, _, _ = _run(mo.uncertainty_weighting(
      K, init_log_variance=0.0, optimizer=optax.sgd(0.1)), losses)
  s, expected = np.zeros(K), []
  for loss in losses.astype(np.float64):
    expected.append(0.5 * np.exp(-s))
    s = s - 0.1 * (0.5 - 0.5 * np.exp(-s) * loss)
  _close(coeffs, np.array(expected) / K, rtol=1e-5)


@pytest.mark.parametrize("period", [1, 2])
def test_dwa_matches_numpy_oracle(period):
  """Liu et al. (MTAN) eq. 7 over period means, as LibMTL's epoch buffer."""
  losses = _loss_sequence(4, steps=12)
  coeffs, updates, _ = _run(mo.dwa(K, temperature=2.0, update_every=period),
                            losses)
  means = losses.astype(np.float64).reshape(-1, period, K).mean(axis=1)
  expected = []
  for t in range(len(losses)):
    epoch = t // period
    if epoch > 1:
      w = means[epoch - 1] / means[epoch - 2]
      expected.append(K * _np_softmax(w / 2.0))
    else:
      expected.append(np.ones(K))
  expected = np.array(expected) / K  # the paper's weights at the mean scale
  _close(coeffs, expected)
  _close(updates, expected)
  assert not np.allclose(expected[-1], 1.0 / K)  # the dynamic phase was reached


def _gradnorm_oracle(losses, norms, alpha, step_fn):
  w, expected = np.ones(K), []
  initial = losses[0]
  for loss, n in zip(losses, norms):
    expected.append(w.copy())
    g = w * n
    ltilde = loss / initial
    r = ltilde / ltilde.mean()
    target = g.mean() * r ** alpha  # held constant, as in the paper
    w = np.maximum(step_fn(w, np.sign(g - target) * n), 0.0)
    w = K * w / w.sum()
  return np.array(expected), w


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradnorm_matches_numpy_oracle(optimizer):
  """Chen et al.: |w_i n_i - mean(w n) r_i^alpha| descended, renormalised."""
  losses = _loss_sequence(5).astype(np.float64)
  rng = np.random.default_rng(6)
  norms = np.exp(rng.normal(0, 1, (T, K)))
  grads = np.einsum("tk,kl->tkl", norms, np.eye(K))  # row i = n_i e_i
  if optimizer == "adam":
    tx = mo.gradnorm(K, alpha=1.5, learning_rate=0.05)
    adam = NpAdam(0.05)
    step_fn = adam.step
  else:
    tx = mo.gradnorm(K, alpha=1.5, optimizer=optax.sgd(0.02))
    step_fn = lambda w, g: w - 0.02 * g
  coeffs, updates, states = _run(tx, losses, grads)
  expected, w_final = _gradnorm_oracle(losses, norms, 1.5, step_fn)
  # The model's coefficients are the paper's weights at the mean scale (1/K).
  _close(coeffs, expected / K, rtol=1e-4)
  _close(updates, expected * norms / K, rtol=1e-4)
  _close(states.task_weights[-1], w_final, rtol=1e-4)
  _close(np.sum(np.asarray(states.task_weights), axis=1), np.full(T, K),
         rtol=1e-5)


def _famo_oracle(losses, w_lr, gamma, min_losses, eps=1e-8):
  """The official FAMO loop with its same-batch second forward: the weights
  of step t come from the logits after the update with L_{t-1} -> L_t."""
  xi, adam, expected = np.zeros(K), NpAdam(w_lr, weight_decay=gamma), []
  for t, loss in enumerate(losses):
    z = _np_softmax(xi)
    d = loss - min_losses + eps
    expected.append((z / d) / np.sum(z / d))
    if t + 1 < len(losses):  # update(curr_loss) after the optimizer step
      delta = np.log(d) - np.log(losses[t + 1] - min_losses + eps)
      jac = np.diag(z) - np.outer(z, z)  # d softmax / d xi
      xi = adam.step(xi, jac.T @ delta)
  return np.array(expected), xi


def test_famo_matches_the_official_update():
  losses = _loss_sequence(7, steps=15).astype(np.float64)
  min_losses = np.array([0.05, -1.0, 0.0])
  tx = mo.famo(K, learning_rate=0.1, weight_decay=0.01, min_losses=min_losses)
  coeffs, updates, states = _run(tx, losses)
  expected, xi = _famo_oracle(losses, 0.1, 0.01, min_losses)
  _close(coeffs, expected, rtol=1e-4)
  _close(updates, expected, rtol=1e-4)
  _close(states.weights, expected, rtol=1e-4)
  # The state holds the logits after the step for L_{T-2} -> L_{T-1}.
  _close(states.logits[-1], xi, rtol=1e-4, atol=1e-6)
  assert np.ptp(np.asarray(states.logits[-1])) > 0.1  # logits really moved


def test_stch_matches_numpy_oracle():
  """Lin et al. (STCH), LibMTL's MTL form: log-sum warm-up, nadir, then STCH."""
  losses = _loss_sequence(8, steps=12).astype(np.float64)
  warmup, nadir_steps, mu, eps = 2, 3, 0.5, 1e-20
  coeffs, updates, _ = _run(
      mo.stch(K, mu=mu, warmup_steps=warmup, nadir_steps=nadir_steps), losses)
  acc, expected = np.zeros(K), []
  for t, loss in enumerate(losses):
    if t < warmup + nadir_steps:
      expected.append(1.0 / (loss + eps))  # d/dL sum log(L + eps)
      if t >= warmup:
        acc += loss
    else:
      nadir = acc / nadir_steps
      ell = np.log(loss / nadir + eps)
      p = _np_softmax(ell / mu)
      # d/dL [K mu log sum exp(ell / mu)] = K p_i d ell_i / dL_i
      expected.append(K * p / (loss / nadir + eps) / nadir)
  expected = np.array(expected) / K  # the paper's gradient at the mean scale
  _close(coeffs, expected, rtol=1e-4)
  _close(updates, expected, rtol=1e-4)


def test_gls_and_scale_invariant_match_numpy_oracles():
  losses = _loss_sequence(9).astype(np.float64)
  geo = np.prod(losses, axis=1, keepdims=True) ** (1.0 / K)
  coeffs, updates, _ = _run(mo.gls(K), losses)
  _close(coeffs, geo / (K * losses), rtol=1e-5)  # d (prod L)^(1/K) / dL_i
  _close(updates, geo / (K * losses), rtol=1e-5)
  coeffs, updates, _ = _run(mo.scale_invariant(K), losses)
  # d sum log L / dL_i, at the mean-gradient scale (1/K).
  _close(coeffs, 1.0 / losses / K, rtol=1e-5)
  _close(updates, 1.0 / losses / K, rtol=1e-5)


def test_gls_is_overflow_safe_for_many_tasks():
  """prod(L) over 16 tasks of 1e30 overflows float32; exp(mean log) does not."""
  losses = np.array([1e30] * 8 + [1e-30] * 8, np.float32)  # geometric mean 1
  tx = mo.gls(16, eps=0.0)
  c = tx.loss_weights(tx.init(jnp.zeros(1)), jnp.asarray(losses))
  _close(c, 1.0 / (16 * losses.astype(np.float64)), rtol=1e-5, atol=0)


def test_db_mtl_matches_numpy_oracle():
  """Lin et al. (DB-MTL), as LibMTL: EMA of log-loss gradients, max norm."""
  losses = _loss_sequence(10).astype(np.float64)
  rng = np.random.default_rng(11)
  grads = rng.normal(0, 1, (T, K, 5)) * np.array([1.0, 20.0, 0.05])[:, None]
  tx = mo.db_mtl(K, decay=0.9, beta_sigma=0.5)
  params = jnp.zeros(5)
  state = tx.init(params)
  step = jax.jit(lambda g, s, loss: tx.update(g, s, params, task_losses=loss))
  buf = np.zeros((K, 5))
  for t, (loss, g) in enumerate(zip(losses, grads), start=1):
    update, state = step(jnp.asarray(g, jnp.float32), state,
                         jnp.asarray(loss, jnp.float32))
    h = g / (loss + 1e-8)[:, None]  # gradient of log(L + eps)
    buf = h + 0.9 / t ** 0.5 * (buf - h)
    u = np.linalg.norm(buf, axis=1)
    alpha = u.max() / u
    # The paper's sum, at the mean-gradient scale (1/K).
    _close(update, alpha @ buf / K, rtol=1e-4, atol=1e-6)
    _close(state.weights, alpha / K, rtol=1e-4)
  _close(state.grad_buffer, buf, rtol=1e-4, atol=1e-7)


def test_db_mtl_is_stacked_only():
  with pytest.raises(ValueError, match="probe"):
    mo.value_and_weighted_grad(lambda p: jnp.stack([p[0], p[1]]),
                               mo.db_mtl(2))(mo.db_mtl(2).init(jnp.ones(3)),
                                             jnp.ones(3))
  tx = mo.db_mtl(2)
  with pytest.raises(ValueError, match="leading task axis"):
    tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3),
              task_losses=jnp.ones(2))


def test_random_loss_weighting_draws_softmax_of_normals():
  """Lin et al. (RLW): c = softmax(e), e ~ N(0, I), one draw per update."""
  steps = 3000
  losses = jnp.ones((steps, K))
  coeffs, updates, states = _run(mo.random_weighting(K, seed=3), losses)
  coeffs = np.asarray(coeffs, np.float64)
  _close(coeffs, updates)
  _close(coeffs, states.weights)
  _close(coeffs.sum(axis=1), np.ones(steps), rtol=1e-5)
  assert len(np.unique(coeffs[:, 0])) == steps  # a fresh draw every step
  # log(c_i / c_j) = e_i - e_j ~ N(0, 2): check the first two moments.
  diffs = np.log(coeffs[:, 0] / coeffs[:, 1])
  assert abs(diffs.mean()) < 0.1 and abs(diffs.var() - 2.0) < 0.2
  assert abs(coeffs[:, 2].mean() - 1.0 / K) < 0.02
  other = mo.random_weighting(K, seed=4)
  first = other.loss_weights(other.init(jnp.zeros(K)), jnp.ones(K))
  assert not np.allclose(first, coeffs[0])  # the seed matters


# ---------------------------------------------------------------------------
# Single-backward path == stacked fallback.
# ---------------------------------------------------------------------------

SINGLE_BACKWARD = {
    "uncertainty_weighting": lambda: mo.uncertainty_weighting(K, 0.1),
    "imtl_l": lambda: mo.imtl_l(K, 0.1),
    "dwa": lambda: mo.dwa(K, update_every=1),
    "gradnorm": lambda: mo.gradnorm(K, learning_rate=0.1),
    "famo": lambda: mo.famo(K, learning_rate=0.1),
    "stch": lambda: mo.stch(K, nadir_steps=2),
    "gls": lambda: mo.gls(K),
    "scale_invariant": lambda: mo.scale_invariant(K),
    "random_weighting": lambda: mo.random_weighting(K, seed=2),
}

_TARGETS = jnp.array([[1.0, 0.0, 2.0, -1.0], [-2.0, 1.0, 0.0, 0.5],
                      [0.5, 0.5, -1.0, 3.0]])


def _regression_losses(params, x):
  pred = x @ params["w"] + params["b"]  # (n,)
  feats = x @ _TARGETS.T  # (n, K): each task regresses a different target
  return jnp.mean((pred[:, None] - feats) ** 2, axis=0) * jnp.array(
      [1.0, 5.0, 0.2])


@pytest.mark.parametrize("name", list(SINGLE_BACKWARD))
def test_single_backward_matches_stacked_fallback(name):
  tx = SINGLE_BACKWARD[name]()
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
  params = {"w": jnp.array([0.3, -0.2, 0.1, 0.0]), "b": jnp.array(0.1)}
  weighted = mo.value_and_weighted_grad(_regression_losses, tx)
  stacked_fn = mo.value_and_task_grads(_regression_losses)

  def both(params, state_a, state_b):  # eager: cheaper than compiling here
    losses, grad = weighted(state_a, params, x)
    losses_b, stacked = stacked_fn(params, x)
    extra = {"layer_grads": stacked} if name == "gradnorm" else {}
    update_a, state_a = tx.update(grad, state_a, params, task_losses=losses,
                                  **extra)
    update_b, state_b = tx.update(stacked, state_b, params,
                                  task_losses=losses_b)
    return update_a, state_a, update_b, state_b

  state_a = state_b = tx.init(params)
  for _ in range(4):
    update_a, state_a, update_b, state_b = both(params, state_a, state_b)
    for leaf_a, leaf_b in zip(jax.tree.leaves(update_a),
                              jax.tree.leaves(update_b)):
      _close(leaf_a, leaf_b, rtol=1e-4, atol=1e-6)
    for leaf_a, leaf_b in zip(jax.tree.leaves(state_a),
                              jax.tree.leaves(state_b)):
      _close(leaf_a, leaf_b, rtol=1e-4, atol=1e-6)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -0.05 * u,
                                                      update_a))


def test_gradnorm_single_backward_needs_layer_grads():
  tx = mo.gradnorm(2)
  with pytest.raises(ValueError, match="layer_grads"):
    tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3),
              task_losses=jnp.ones(2))
  with pytest.raises(ValueError, match=r"layer_grads.*\(3, 2\)"):
    tx.update(jnp.ones(3), tx.init(jnp.zeros(3)), jnp.zeros(3),
              task_losses=jnp.ones(2), layer_grads=jnp.ones((3, 2)))


# ---------------------------------------------------------------------------
# FAMO: one backward pass; the toy.
# ---------------------------------------------------------------------------


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (jit, scan, cond, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          yield from _eqns(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          yield from _eqns(sub)


def _train_step_jaxpr(num_tasks, single_backward=True):
  d, h, n = 5, 7, 11
  params = {"shared": jnp.ones((d, h)) * 0.1,
            "heads": jnp.ones((h, num_tasks)) * 0.1}
  x, y = jnp.ones((n, d)), jnp.ones((n, num_tasks))

  def task_losses(params, x, y):
    feats = jnp.tanh(x @ params["shared"])
    return jnp.mean((feats @ params["heads"] - y) ** 2, axis=0)

  famo = mo.famo(num_tasks)
  tx = optax.chain(famo, optax.adam(1e-3))

  def step(params, opt_state):
    if single_backward:
      losses, grads = mo.value_and_weighted_grad(task_losses, famo)(
          opt_state[0], params, x, y)
    else:
      # The vmapped Jacobian (chunk_size=None): one K-batched product.
      losses, grads = mo.value_and_task_grads(task_losses, chunk_size=None)(
          params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses)
    return optax.apply_updates(params, updates), opt_state

  closed = jax.make_jaxpr(jax.jit(step))(params, tx.init(params))
  eqns = list(_eqns(closed.jaxpr))
  # Matrix products that touch the batch (n rows): the forward and backward
  # passes of the network, not the method's K-vector arithmetic.
  products = [
      tuple(e.outvars[0].aval.shape) for e in eqns
      if e.primitive.name == "dot_general"
      and any(n in v.aval.shape for v in e.invars)]
  return len(eqns), products, (h, d)


def test_famo_takes_one_backward_pass_whatever_k():
  """The traced training step (value_and_weighted_grad + FAMO + Adam) holds
  one forward and one backward pass: the same program for K = 2 and K = 16,
  with exactly one product forming the shared layer's gradient and no
  K-batched product; the per-task Jacobian path, for contrast, has one."""
  count2, products2, shared_grad = _train_step_jaxpr(2)
  count16, products16, _ = _train_step_jaxpr(16)
  assert count2 == count16  # the same program, whatever K
  # forward: x W, f V; backward: dV, df, dW. Five, for both K.
  assert len(products2) == len(products16) == 5
  for products in (products2, products16):
    assert products.count(shared_grad) == 1
    assert all(len(shape) == 2 for shape in products)  # nothing K-batched
  _, jacobian_products, _ = _train_step_jaxpr(16, single_backward=False)
  assert (16, *shared_grad) in jacobian_products  # K backward passes


def _pareto_residual(theta):
  """Norm of the min-norm convex combination of the two task gradients,
  relative to the larger gradient: 0 at a Pareto-stationary point."""
  jac = np.asarray(jax.jacobian(lambda t: toy_losses(t, 0.1))(theta),
                   np.float64)
  g1, g2 = jac
  diff = g1 - g2
  a = np.clip(-(g2 @ diff) / max(diff @ diff, 1e-30), 0.0, 1.0)
  return np.linalg.norm(a * g1 + (1 - a) * g2) / max(
      np.linalg.norm(g1), np.linalg.norm(g2))


def test_famo_reaches_the_pareto_front_on_the_toy():
  """Nash-MTL / FAMO toy (L1 scaled by 0.1), official toy settings: gamma 0,
  min losses (-2.1, -21), Adam lr 1e-3, one backward pass per step. 25 000
  steps (the official run uses 50 000): the slowest start arrives after
  about 24 000. Linear scalarisation, same steps, ends off the Pareto set
  from two starts (where exactly depends on float rounding: Adam amplifies
  the tiny gradients of the flat region, so only the residual is asserted)."""
  famo = mo.famo(2, learning_rate=0.025, weight_decay=0.0,
                 min_losses=(-2.1, -21.0))
  final = np.asarray(mo.toy.run_toy(
      famo, NASH_MTL_STARTS, num_steps=25_000, record_every=25_000,
      l1_scale=0.1).final)
  for start, (x, y) in zip(NASH_MTL_STARTS, final):
    assert -7.0 <= x <= 7.0, (start, x, y)
    assert abs(y + 8.36) < 0.02, (start, x, y)
    assert _pareto_residual(jnp.array([x, y])) < 1e-3, (start, x, y)
  stuck = mo.linear_scalarization(2)
  stuck_final = np.asarray(mo.toy.run_toy(
      stuck, NASH_MTL_STARTS, num_steps=25_000, record_every=25_000,
      l1_scale=0.1).final)
  stuck_residuals = [_pareto_residual(jnp.asarray(p)) for p in stuck_final]
  assert sum(r > 1e-2 for r in stuck_residuals) == 2, stuck_residuals


# ---------------------------------------------------------------------------
# Errors, degenerate and non-finite input.
# ---------------------------------------------------------------------------

ALL = dict(SINGLE_BACKWARD, db_mtl=lambda: mo.db_mtl(K))


@pytest.mark.parametrize("name", list(ALL))
def test_missing_or_misshapen_task_losses_fail_at_trace_time(name):
  tx = ALL[name]()
  grads = jnp.ones((K, 2))
  params = jnp.zeros(2)
  state = tx.init(params)
  step = jax.jit(lambda g, s, **kw: tx.update(g, s, params, **kw))
  if name == "random_weighting":
    # RLW's weights do not read the losses: on stacked gradients (its
    # aggregator form) task_losses may be left out.
    step(grads, state)
  else:
    with pytest.raises(ValueError, match=f"{name}.*task_losses.*required"):
      step(grads, state)
  wrong_k = rf"task_losses has shape \(2,\).*\({K},\)"
  with pytest.raises(ValueError, match=wrong_k):
    step(grads, state, task_losses=jnp.ones(2))
  if hasattr(tx, "loss_weights"):
    with pytest.raises(ValueError, match="task_losses has shape"):
      tx.loss_weights(state, jnp.ones(K + 1))


def test_unstacked_gradient_without_params_gets_a_hint():
  tx = mo.famo(K)
  with pytest.raises(ValueError, match="pass params"):
    tx.update(jnp.ones(4), tx.init(jnp.zeros(4)), task_losses=jnp.ones(K))


@pytest.mark.parametrize("name", list(ALL))
def test_zero_negative_huge_and_tiny_losses_stay_finite(name):
  tx = ALL[name]()
  pattern = np.array([[0.0, -3.0, 1e30], [1e-30, 0.0, -1e-30],
                      [2.0, 1e-38, 0.0], [1e30, 1e30, 1e-30]], np.float32)
  losses = np.tile(pattern, (10, 1))
  grads = np.random.default_rng(0).normal(size=(len(losses), K, K))
  coeffs, updates, states = _run(tx, losses, grads)
  assert np.all(np.isfinite(coeffs)) and np.all(np.isfinite(updates))
  assert np.all(np.isfinite(states.weights))


# The paper's weight caps, at the mean-gradient scale (1/K).
@pytest.mark.parametrize("factory,loss,cap", [
    (mo.uncertainty_weighting, 0.0, 0.5 * np.exp(10.0) / K),
    (mo.uncertainty_weighting, -1.0, 0.5 * np.exp(10.0) / K),
    (mo.imtl_l, -1.0, np.exp(10.0) / K), (mo.imtl_l, 0.0, np.exp(10.0) / K)])
def test_learned_scales_stay_bounded_without_a_minimum(factory, loss, cap):
  """Zero or negative losses give the scale objective no minimum; the clip
  at |s| <= 10 caps the weight (and the update of unit gradients) near 2e4,
  not at the 1e13 of a float-range clip."""
  losses = np.full((2000, K), loss, np.float32)
  coeffs, updates, states = _run(factory(K, learning_rate=0.1), losses)
  assert np.all(np.isfinite(coeffs))
  assert np.max(np.abs(np.asarray(states.log_scales[-1]))) == 10.0
  _close(np.max(coeffs), cap, rtol=1e-5)
  assert np.max(np.abs(np.asarray(updates))) <= cap * (1 + 1e-5)
  # The bound is a hyper-parameter: 30 restores the old range.
  _, _, wide = _run(factory(K, learning_rate=0.1, log_scale_bound=30.0),
                    losses)
  assert np.max(np.abs(np.asarray(wide.log_scales[-1]))) == 30.0


def _spike_then_ordinary(tx, spike, ordinary, losses_spike, losses, steps=100):
  params = jnp.zeros(np.shape(ordinary)[1:])
  state = tx.init(params)
  step = jax.jit(lambda g, s, l: tx.update(g, s, params, task_losses=l))
  for _ in range(2):
    _, state = step(jnp.asarray(spike), state, jnp.asarray(losses_spike))
  for _ in range(steps):
    _, state = step(jnp.asarray(ordinary), state, jnp.asarray(losses))
  return state


@pytest.mark.parametrize("name", ["gradnorm", "uncertainty_weighting",
                                  "imtl_l"])
def test_learned_weights_keep_moving_after_one_huge_input(name):
  """A gradient norm of 1e20 (GradNorm) or a loss of 1e20 (UW, IMTL-L)
  overflows Adam's second moment in float32: the inner step is skipped, so
  the state stays finite and 100 ordinary steps end where they would have
  without the spike (before: the weights froze for ever)."""
  ordinary = np.diag([4.0, 1.0]).astype(np.float32)
  if name == "gradnorm":
    tx = mo.gradnorm(2)
    spike, l_spike, l_ord = np.diag([1e20, 3e20]), np.ones(2), np.ones(2)
  else:
    tx = getattr(mo, name)(2)
    spike, l_spike, l_ord = ordinary, np.array([1e20, 1.0]), np.array([2., 1.])
  hit = _spike_then_ordinary(tx, spike.astype(np.float32), ordinary,
                             l_spike.astype(np.float32),
                             l_ord.astype(np.float32))
  clean = _spike_then_ordinary(tx, ordinary, ordinary,
                               l_ord.astype(np.float32),
                               l_ord.astype(np.float32), steps=100)
  for leaf in jax.tree.leaves(hit):
    assert np.all(np.isfinite(np.asarray(leaf)))
  learned = "task_weights" if name == "gradnorm" else "log_scales"
  moved = np.asarray(getattr(clean, learned))
  start = np.asarray(getattr(tx.init(jnp.zeros(2)), learned))
  assert np.max(np.abs(moved - start)) > 0.3  # the weights do move
  _close(getattr(hit, learned), moved, rtol=0.05, atol=0.05)
  if name == "gradnorm":
    _close(hit.task_weights, [0.40, 1.60], atol=0.01)


def _f16(x):
  return jnp.asarray(x, jnp.float16)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("factory,grads,losses", [
    (mo.stch, _f16(np.ones((2, 3))), [0.0, 1.0]),
    (mo.scale_invariant, _f16(np.ones((2, 3))), [0.0, 1.0]),
    (mo.db_mtl, _f16(np.ones((2, 3))), [0.0, 1.0]),
    (mo.stch, np.full((2, 3), 1e19, np.float32), [0.0, 0.0]),
    (mo.gls, np.full((3, 3), 1e27, np.float32), [0.0, 0.0, 1e30]),
])
def test_reciprocal_loss_weights_never_overflow_the_update(factory, grads,
                                                           losses, jit):
  """1/(L + eps) for a zero loss times the gradient can pass the gradient
  dtype's range (float16: 65504; float32 with |g| ~ 1e19): the update stays
  finite, in the gradient dtype, along the exact direction, and the recorded
  weights still give it as sum_i w_i g_i."""
  grads = jnp.asarray(grads)
  num_tasks = grads.shape[0]
  tx = factory(num_tasks)
  params = jnp.zeros(grads.shape[1:], grads.dtype)
  losses = jnp.asarray(losses, jnp.float32)
  step = lambda g, s: tx.update(g, s, params, task_losses=losses)
  step = jax.jit(step) if jit else step
  update, state = step(grads, tx.init(params))
  assert update.dtype == grads.dtype
  assert np.all(np.isfinite(np.asarray(update, np.float64)))
  g64 = np.asarray(grads, np.float64)
  weights = np.asarray(state.weights, np.float64)
  if factory is not mo.db_mtl:  # db_mtl weighs its EMA buffer, not g
    recombined = weights @ g64
    _close(update, recombined, rtol=2e-3)
  # Oracle direction: the uncapped coefficients in float64.
  eps = 1e-20 if factory is mo.stch else 1e-8
  inv = 1.0 / (np.asarray(losses, np.float64) + eps)
  if factory is mo.gls:
    logs = np.log(np.asarray(losses, np.float64) + eps)
    inv = np.exp(logs.mean() - logs) / num_tasks
  exact = inv @ g64
  if factory is mo.db_mtl:  # every task enters with the largest EMA norm
    exact = np.sum(g64 / np.linalg.norm(g64, axis=1, keepdims=True), axis=0)
  u = np.asarray(update, np.float64)
  _close(u / np.linalg.norm(u), exact / np.linalg.norm(exact), rtol=1e-3)
  assert np.linalg.norm(u) > 1e3  # capped near the dtype's range, not zeroed


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("bad", [-np.inf, np.inf, np.nan])
def test_db_mtl_non_finite_loss_is_skipped_and_keeps_the_buffer(bad, jit):
  """-inf was clamped to eps (update 1e6 too large), +inf silently dropped the
  task: now the update is NaN, apply_if_finite skips it, the EMA is kept."""
  tx = optax.chain(mo.db_mtl(2), optax.apply_if_finite(optax.sgd(0.1), 3))
  params = jnp.zeros(2)
  step = lambda g, s, l: tx.update(g, s, params, task_losses=l)
  step = jax.jit(step) if jit else step
  _, state = step(jnp.eye(2), tx.init(params), jnp.array([1.0, 2.0]))
  updates, new_state = step(jnp.eye(2), state, jnp.array([1.0, bad]))
  np.testing.assert_array_equal(updates, np.zeros(2))
  assert int(new_state[1].notfinite_count) == 1
  for old, new in zip(jax.tree.leaves(state[0]), jax.tree.leaves(new_state[0])):
    np.testing.assert_array_equal(old, new)
  raw, _ = mo.db_mtl(2).update(jnp.eye(2), state[0], params,
                               task_losses=jnp.array([1.0, bad]))
  assert np.all(np.isnan(np.asarray(raw)))


@pytest.mark.parametrize("name", list(SINGLE_BACKWARD))
def test_nan_loss_gives_nan_update_and_keeps_state(name):
  """Single-backward path: a NaN loss makes the update NaN, so
  chain(method, apply_if_finite(opt)) skips the step; the state is kept."""
  method = SINGLE_BACKWARD[name]()
  tx = optax.chain(method, optax.apply_if_finite(optax.sgd(0.1), 3))
  params = jnp.ones(4)
  grad = jnp.arange(4.0)
  state = tx.init(params)
  extra = ({"layer_grads": jnp.ones((K, 2))} if name == "gradnorm" else {})
  _, state = tx.update(grad, state, params, task_losses=jnp.ones(K), **extra)
  bad = jnp.array([1.0, jnp.nan, 1.0])
  updates, new_state = tx.update(grad, state, params, task_losses=bad, **extra)
  np.testing.assert_array_equal(optax.apply_updates(params, updates), params)
  for old, new in zip(jax.tree.leaves(state[0]), jax.tree.leaves(new_state[0])):
    np.testing.assert_array_equal(old, new)
  raw, _ = method.update(grad, state[0], params, task_losses=bad, **extra)
  assert np.all(np.isnan(raw))


@pytest.mark.parametrize("factory,name", [(mo.dwa, "update_every"),
                                          (mo.stch, "warmup_steps")])
def test_int_hyperparameters_must_be_static(factory, name):
  injected = optax.inject_hyperparams(factory, static_args=("num_tasks",))
  with pytest.raises(TypeError, match=f"{name}.*static"):
    injected(num_tasks=K, **{name: 2}).init(jnp.zeros(2))


def test_injected_floats_match_plain_factories_over_steps():
  """Floats (temperature, learning_rate, weight_decay, alpha, mu, eps) are
  injectable: a jitted multi-step run with inject_hyperparams equals the
  plain factory."""
  losses = _loss_sequence(12, steps=6)
  for factory, kwargs, static in (
      (mo.famo, {"learning_rate": 0.1, "weight_decay": 0.01}, ()),
      (mo.stch, {"mu": 0.5, "eps": 1e-12, "warmup_steps": 0, "nadir_steps": 2},
       ("warmup_steps", "nadir_steps")),
  ):
    injected = optax.inject_hyperparams(
        factory, static_args=("num_tasks", *static))(num_tasks=K, **kwargs)
    params = jnp.zeros(K)

    @jax.jit
    def run(losses, injected=injected):
      def step(state, loss):
        update, state = injected.update(jnp.eye(K), state, params,
                                        task_losses=loss)
        return state, update
      return jax.lax.scan(step, injected.init(params), losses)[1]

    _, plain, _ = _run(factory(K, **kwargs), losses)
    _close(run(jnp.asarray(losses)), plain, rtol=1e-5)


def test_random_loss_weighting_agrees_with_the_stacked_rlw_aggregator():
  """mo.random_weighting (the stacked-gradient RLW) draws the same weights
  from the same seed: the two forms of RLW are one method."""
  grads = jax.random.normal(jax.random.PRNGKey(0), (K, 4))
  params = jnp.zeros(4)
  with pytest.warns(DeprecationWarning, match="random_weighting"):
    ours = mo.random_loss_weighting(K, seed=5)
  theirs = mo.random_weighting(K, 5)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  for _ in range(3):
    u_ours, s_ours = ours.update(grads, s_ours, params, task_losses=jnp.ones(K))
    u_theirs, s_theirs = theirs.update(grads, s_theirs, params)
    _close(u_ours, u_theirs, rtol=1e-6)
    _close(s_ours.weights, s_theirs.weights, rtol=1e-6)


# ---------------------------------------------------------------------------
# Deprecated spellings keep working, with a warning naming the new one.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("factory,old,new", [
    (mo.famo, {"w_lr": 0.1, "gamma": 0.01},
     {"learning_rate": 0.1, "weight_decay": 0.01}),
    (mo.dwa, {"period": 2}, {"update_every": 2}),
    (mo.db_mtl, {"beta": 0.5}, {"decay": 0.5}),
    (mo.psmgd, {"period": 2}, {"update_every": 2}),
])
def test_old_argument_names_warn_and_give_the_same_method(factory, old, new):
  losses = _loss_sequence(13, steps=5)
  grads = jax.random.normal(jax.random.PRNGKey(2), (5, K, K))
  with pytest.warns(DeprecationWarning, match=list(new)[0]):
    legacy = factory(K, **old)
  _, expected, _ = _run(factory(K, **new), losses, grads)
  _, got, _ = _run(legacy, losses, grads)
  _close(got, expected, rtol=1e-6)


@pytest.mark.parametrize("factory,old", [
    (mo.gradnorm, "step"), (mo.famo, "step"), (mo.stch, "step"),
    (mo.db_mtl, "step"), (mo.ldc_mtl, "step"), (mo.dwa, "period_step")])
def test_old_state_field_names_warn_and_read_count(factory, old):
  # DWA's counter restarts when a period completes: make the period 2 steps.
  tx = factory(K, update_every=2) if factory is mo.dwa else factory(K)
  params = jnp.zeros(K)
  _, state = tx.update(jnp.eye(K), tx.init(params), params,
                       task_losses=jnp.ones(K))
  with pytest.warns(DeprecationWarning, match=r"\.count"):
    value = getattr(state, old)
  assert int(value) == int(state.count) == 1
