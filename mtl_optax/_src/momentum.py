"""Methods whose backward cost does not grow with K: M-ConFIG and PSMGD.

* :func:`momentum_config` takes ONE task's gradient per step (round robin)
  and keeps a momentum per task; the update is ConFIG's conflict-free
  direction on the momenta.
* :func:`psmgd` recomputes MGDA's weights only every ``update_every`` steps,
  from stacked per-task gradients, and in between is a loss weighting: one
  backward pass of the weighted loss with the stored weights.

Both accept stacked per-task gradients (leaves ``(K, *shape)``) at every step,
which is what the conformance suite and ``mo.value_and_task_grads`` give;
their point is the cheaper input they accept on most steps: one gradient
shaped like ``params`` (pass ``params`` to ``update`` so that it is
recognised).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional
import warnings

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation
from mtl_optax._src.closed_form import config_weights

__all__ = ("MomentumConfigState", "PSMGDState", "momentum_config", "psmgd")


def _task_axis_zeros(num_tasks: int, params: Any) -> Any:
  def zeros(p):
    p = jnp.asarray(p)
    return jnp.zeros((num_tasks, *p.shape), jnp.promote_types(p.dtype,
                                                              jnp.float32))
  return jax.tree.map(zeros, params)


def _float_zeros(params: Any) -> Any:
  return jax.tree.map(lambda p: jnp.zeros(
      jnp.shape(p), jnp.promote_types(jnp.asarray(p).dtype, jnp.float32)),
                      params)


# --------------------------------------------------------------------------
# M-ConFIG.
# --------------------------------------------------------------------------


class MomentumConfigState(NamedTuple):
  """State of :func:`momentum_config`.

  Attributes:
    weights: ``(K,)`` ConFIG's coefficients on the bias-corrected momenta of
      the last update (``direction = sum_i weights[i] m_hat_i``); zero until
      every task has been seen.
    count: ``()`` int32, updates so far; the next update expects the
      gradient of task ``count % K``.
    task_counts: ``(K,)`` int32, gradients folded into each momentum.
    momenta: tree with leaves ``(K, *shape)``: the per-task momenta ``m_i``.
    direction_momentum: tree shaped like params: the pseudo first moment
      ``(1 - beta_1^t) d`` of the last normalised update (normalise only).
    second_moment_root: tree shaped like params: ``sqrt(s)``, the root of
      the EMA ``s`` of the squared pseudo gradients (normalise only). Kept
      as a root so that it cannot overflow while the update is
      representable; ``second_moment`` (``s`` itself) is its deprecated
      read-only form.
    ready_count: ``()`` int32, updates since every task was seen (``t``).
  """
  weights: jax.Array
  count: jax.Array
  task_counts: jax.Array
  momenta: Any
  direction_momentum: Any
  second_moment_root: Any
  ready_count: jax.Array

  @property
  def second_moment(self):
    warnings.warn("MomentumConfigState.second_moment is deprecated: read "
                  ".second_moment_root (its square root, which cannot "
                  "overflow).", DeprecationWarning, stacklevel=2)
    return jax.tree.map(jnp.square, self.second_moment_root)


def _folded_momenta(momenta, rows, task, beta_1, num_tasks):
  """``m_task <- beta_1 m_task + (1 - beta_1) g`` with ``g`` row ``task`` of
  ``rows`` (leaves ``(K, *s)``, or ``(1, *s)`` broadcast).

  One elementwise select over the ``(K, *s)`` momenta, not a dynamic slice
  and update of the row: the momenta are copied anyway (they are not
  donated), and the select needs neither the row's slice nor a separate
  copy kernel (M-ConFIG's small-MLP step: 132 -> 126 kernels).
  """
  b1 = jnp.asarray(beta_1, jnp.float32)

  def fold(m, g):
    is_task = jnp.reshape(jnp.arange(num_tasks) == task,
                          (num_tasks,) + (1,) * (m.ndim - 1))
    folded = b1.astype(m.dtype) * m + (1 - b1).astype(m.dtype) * g.astype(
        m.dtype)
    return jnp.where(is_task, folded, m)

  return jax.tree.map(fold, momenta, rows)


def _bias_corrections(counts, beta_1):
  """``1 / (1 - beta_1^{t_i})``, which makes the momenta ``m_hat`` (zero
  for unseen tasks)."""
  correction = 1 - jnp.asarray(beta_1, jnp.float32) ** counts.astype(
      jnp.float32)
  return jnp.where(counts > 0, 1 / jnp.where(counts > 0, correction, 1.0),
                   0.0)


def _config_coefficients(momenta, inv, pref, dtype):
  """ConFIG's coefficients on the bias-corrected momenta ``m_hat_i = inv_i
  m_i`` (NaN when their Gram matrix is not finite).

  The Gram matrix of ``m_hat`` is ``diag(inv) G diag(inv)`` with ``G`` the
  momenta's scale-free one (ConFIG's coefficients do not depend on a common
  scale), so no corrected copy of the momenta is formed.
  """
  dtype = jnp.promote_types(dtype, jnp.float32)
  inv = inv.astype(dtype)
  gram = tree_math.normalized_gram(momenta).gram.astype(dtype)
  gram = inv[:, None] * gram * inv[None, :]
  return base.poison_if_nonfinite(config_weights(gram, pref(gram.dtype)),
                                  gram)


def _normalise_like_adam(direction, state, count, beta_1, beta_2, eps):
  """M-ConFIG's second moment, leaf by leaf: the pseudo first moment
  ``D = (1 - beta_1^t) d``, the pseudo gradient ``(D - beta_1 D_old) / (1 -
  beta_1)`` whose EMA would be the direction, the root ``r = sqrt(s)`` of
  its squared EMA, and ``d / (sqrt(s_hat) + eps)``; ``(out, D, r)`` trees.

  ``r_new = hypot(sqrt(beta_2) r, sqrt(1 - beta_2) g)`` is
  ``sqrt(beta_2 s + (1 - beta_2) g^2)`` without forming ``g^2``, which
  overflows float32 for pseudo gradients above ~1e19.
  """
  t = count.astype(jnp.float32)
  b1 = jnp.asarray(beta_1, jnp.float32)
  b2 = jnp.asarray(beta_2, jnp.float32)
  keep, add = jnp.sqrt(b2), jnp.sqrt(1 - b2)

  def leaf(d, old_m, old_r):
    cast = lambda x: jnp.asarray(x).astype(d.dtype)
    pseudo_m = d * cast(1 - b1 ** t)
    pseudo_grad = (pseudo_m - cast(b1) * old_m) / cast(1 - b1)
    root = jnp.hypot(cast(keep) * old_r, cast(add) * pseudo_grad)
    out = d / (root / cast(jnp.sqrt(1 - b2 ** t)) + cast(eps))
    return out, pseudo_m, root

  parts = jax.tree.map(leaf, direction, state.direction_momentum,
                       state.second_moment_root)
  return jax.tree.transpose(jax.tree.structure(direction),
                            jax.tree.structure((0, 0, 0)), parts)


def _momentum_config_step(updates, state, stacked, num_tasks, beta_1, beta_2,
                          eps, normalize, pref):
  """One M-ConFIG update: fold the gradient of task ``step % K`` into its
  momentum, ConFIG on the bias-corrected momenta, the optional Adam-like
  normalisation; ``(update, new_state, finite)``."""
  task = state.count % num_tasks
  # Stacked input: row ``task`` is read inside the fold's select, with no
  # dynamic slice; one gradient broadcasts over the task axis there.
  rows = updates if stacked else jax.tree.map(lambda g: g[None], updates)
  input_ok = base.all_finite(updates)
  momenta = _folded_momenta(state.momenta, rows, task, beta_1, num_tasks)
  counts = state.task_counts + (jnp.arange(num_tasks) == task).astype(
      state.task_counts.dtype)
  inv = _bias_corrections(counts, beta_1)
  ready = jnp.all(counts > 0)
  coeffs = jnp.where(ready, _config_coefficients(momenta, inv, pref,
                                                 state.weights.dtype), 0.0)
  scale = num_tasks if normalize else 1
  direction = tree_math.weighted_task_sum(
      coeffs * inv.astype(coeffs.dtype) * scale, momenta)
  ready_count = jnp.where(ready, state.ready_count + 1, state.ready_count)
  new_state = MomentumConfigState(coeffs, state.count + 1, counts, momenta,
                                  state.direction_momentum,
                                  state.second_moment_root, ready_count)
  out = direction
  if normalize:
    out, pseudo_m, root = _normalise_like_adam(
        direction, state, jnp.maximum(ready_count, 1), beta_1, beta_2, eps)
    new_state = new_state._replace(**base.keep_if_finite(
        ready, {"direction_momentum": pseudo_m, "second_moment_root": root},
        {"direction_momentum": state.direction_momentum,
         "second_moment_root": state.second_moment_root}))
  out = jax.tree.map(
      lambda o, u: jnp.where(input_ok, jnp.where(ready, o, 0.0), jnp.nan
                             ).astype(u.dtype), out, updates)
  finite = input_ok & base.all_finite(out) & base.all_finite(coeffs)
  return out, new_state, finite


def momentum_config(num_tasks: int, beta_1: float = 0.9,
                    beta_2: float = 0.999, eps: float = 1e-8,
                    normalize: bool = True,
                    pref_vector: base.PrefVector = None
                    ) -> optax.GradientTransformationExtraArgs:
  """M-ConFIG: ConFIG on per-task momenta, one task's gradient per step.

  Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics
  Informed Neural Networks", ICLR 2025 (arXiv:2408.11104), the momentum
  variant (official code: ``conflictfree.PseudoMomentumOperator``). Update
  ``n`` takes the gradient of task ``i = n mod K`` only (the official
  round robin), ``m_i <- beta_1 m_i + (1 - beta_1) g_i``, and returns
  ``d = ConFIG(m_hat_1, ..., m_hat_K)`` with ``m_hat_i = m_i / (1 -
  beta_1^{t_i})`` (``t_i`` the task's own count): one backward pass per step
  whatever K is. Until every task has been seen the update is zero.

  .. math::

     m_i &\\leftarrow \\beta_1 m_i + (1 - \\beta_1) g_i \\quad (i = n \\bmod K), \\\\
     d &= \\mathrm{ConFIG}(\\hat m_1, \\dots, \\hat m_K), \\qquad
     \\hat m_i = \\frac{m_i}{1 - \\beta_1^{t_i}}

  With ``normalize=True`` (the official operator) the direction is also
  divided, element-wise, by ``sqrt(s_hat) + eps``: ``s`` is an EMA
  (``beta_2``, bias-corrected over the ``t`` steps since all tasks were seen)
  of the squares of the pseudo gradient
  ``(D_t - beta_1 D_{t-1}) / (1 - beta_1)``, ``D_t = (1 - beta_1^t) d_t``,
  i.e. the gradient whose first moment would be ``d``. This makes the
  method an Adam-like optimizer without the learning rate: chain it with
  ``optax.sgd(lr)``, not with Adam (the official advice).

  Input, per step: either one gradient shaped like ``params`` (pass
  ``params``): the gradient of task ``state.count % K``, e.g.
  ``jax.grad(lambda p: task_losses(p)[state.count % num_tasks])(params)``
  (jit-friendly: a dynamic index into the loss vector); or stacked
  per-task gradients, of which only row ``state.count % K`` is used (any
  non-finite row still makes the update NaN).

  Output scale: ``normalize=True``: the official, element-wise about 1
  (invariant to the gradients' scale up to ``eps``; the direction is taken
  at the official sum-of-projections scale inside). ``normalize=False``: the
  ConFIG direction of :func:`mtl_optax.config` on the momenta, the ``g0``
  scale (``optax.scale(num_tasks)`` gives the official operator's length).

  Args:
    num_tasks: number of tasks K.
    beta_1: momentum of the per-task first moments (official 0.9).
      Injectable.
    beta_2: EMA coefficient of the second moment (official 0.999).
      Injectable.
    eps: added to ``sqrt(s_hat)`` (official 1e-8). Injectable.
    normalize: apply the second-moment normalisation (static bool).
    pref_vector: optional ``(K,)`` ConFIG preference; default all ones.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`MomentumConfigState`. The state holds K parameter-sized
    momenta.

  Example (two tasks, gradients of task 0 then task 1):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.momentum_config(2, normalize=False)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for g in ([1., 0.], [0., 1.]):
    ...   update, state = tx.update(jnp.array(g), state, params)
    >>> print(np.asarray(update, np.float64).round(4), int(state.count))
    [0.5 0.5] 2
  """
  method = "momentum_config"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  for name, value in (("beta_1", beta_1), ("beta_2", beta_2), ("eps", eps)):
    validation.check_nonnegative(value, name, method)
  pref = base.preference_vector(pref_vector, num_tasks, method, 1.0)

  def init_fn(params):
    dtype = base.state_dtype(params)
    counter = jnp.zeros((), jnp.int32)
    return MomentumConfigState(
        jnp.zeros((num_tasks,), dtype), counter,
        jnp.zeros((num_tasks,), jnp.int32), _task_axis_zeros(num_tasks, params),
        _float_zeros(params), _float_zeros(params), counter)

  def step(updates, state, params, extra_args, stacked):
    del params, extra_args
    return _momentum_config_step(updates, state, stacked, num_tasks, beta_1,
                                 beta_2, eps, normalize, pref)

  return base.guarded_transformation(num_tasks, method, init_fn, step,
                                     accepts_unstacked=True)


# --------------------------------------------------------------------------
# PSMGD.
# --------------------------------------------------------------------------


class PSMGDState(NamedTuple):
  """State of :func:`psmgd`.

  Attributes:
    weights: ``(K,)`` MGDA weights of the last solve: the coefficients of
      every update until the next one.
    steps_since_solve: ``()`` int32, updates since the last solve
      (saturating at ``update_every``; ``update_every`` at the start, so the
      first stacked update solves).
    residual: ``()`` the simplex solver's residual at the last solve.
  """
  weights: jax.Array
  steps_since_solve: jax.Array
  residual: jax.Array


def _solved(updates, state, update_every, max_iter, tol):
  """PSMGD's state with fresh MGDA weights if a solve is due (warm-started
  on the stacked gradients' scale-free Gram matrix)."""
  gram = tree_math.normalized_gram(updates).gram.astype(
      jnp.promote_types(state.weights.dtype, jnp.float32))
  uniform = base.uniform_weights(gram.shape[0], gram.dtype)
  start = base.finite_or(state.weights.astype(gram.dtype), uniform)
  sol = solvers.min_norm_weights(gram, start, max_iter, tol)
  weights = base.poison_if_nonfinite(sol.weights, gram)
  due = state.steps_since_solve >= update_every
  return PSMGDState(
      jnp.where(due, weights, state.weights).astype(state.weights.dtype),
      jnp.where(due, 0, state.steps_since_solve),
      jnp.where(due, sol.residual, state.residual).astype(
          state.residual.dtype))


@deprecation.renamed_arguments(period="update_every")
def psmgd(num_tasks: int, update_every: int = 4, max_iter: int = 500,
          tol: Optional[float] = None) -> base.LossWeightingTransformation:
  """PSMGD: periodic stochastic multi-gradient descent.

  Xu, Ju, Liu & Yang, "PSMGD: Periodic Stochastic Multi-Gradient Descent for
  Fast Multi-Objective Optimization", AAAI 2025 (arXiv:2412.10961). MGDA's
  weights ``w = argmin_{w in simplex} ||sum_i w_i g_i||^2`` change little
  over a few steps, so they are recomputed every ``update_every`` steps
  (the paper's ``R``) and reused
  in between: ``d_t = sum_i w_{R floor(t/R)} g_i``. Between solves the update
  is the gradient of one weighted loss ``sum_i w_i L_i``, so the backward
  cost per step is ``(K + R - 1) / R`` passes on average instead of K.

  .. math::

     d_t &= \\sum_i w_{R \\lfloor t / R \\rfloor, i}\\, g_i, \\\\
     w &= \\arg\\min_{w \\in \\Delta} \\Big\\| \\sum_i w_i g_i \\Big\\|^2
     \\text{ (re-solved every } R \\text{ steps)}

  Input, per step:

  * stacked per-task gradients (leaves ``(K, *shape)``): when
    ``steps_since_solve >= update_every`` (every ``update_every`` steps, and
    the first
    update) the weights are re-solved on their scale-free Gram matrix
    (warm-started, as :func:`mtl_optax.mgda`), then ``d = sum_i w_i g_i``;
    on other steps ``d`` uses the stored weights;
  * one ordinary gradient shaped like ``params`` (pass ``params``): the
    gradient of ``sum_i w_i L_i`` with the stored weights (the single-backward
    path, :func:`mtl_optax.value_and_weighted_grad`), handed through. A solve
    that is due waits for the next stacked update.

  A training loop therefore computes stacked gradients on steps
  ``n % update_every == 0`` (a Python-side count; two jitted step functions)
  and
  the weighted-loss gradient otherwise. ``task_losses`` is required (the
  single-backward protocol); the weights do not depend on it.

  Output scale: ``g0``'s (the weights are on the simplex; MGDA's direction).

  Args:
    num_tasks: number of tasks K.
    update_every: the paper's ``R``, steps between solves (static int >= 1;
      1 is MGDA; formerly ``period``, a deprecated alias).
    max_iter: cap on the simplex solver's iterations.
    tol: solver tolerance (default 1e-5 in float32, 1e-10 in float64).

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`PSMGDState`.

  Example (TorchJD's matrix: MGDA's weights, then reused for an ordinary
  gradient):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.psmgd(2, update_every=2)
    >>> params, losses = jnp.zeros(3), jnp.ones(2)
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> update, state = tx.update(grads, tx.init(params), params,
    ...                           task_losses=losses)
    >>> print(np.asarray(update, np.float64).round(4),
    ...       np.asarray(state.weights, np.float64).round(4))
    [0. 1. 1.] [0.6 0.4]
    >>> update, state = tx.update(jnp.ones(3), state, params,
    ...                           task_losses=losses)
    >>> print(np.asarray(update), int(state.steps_since_solve))
    [1. 1. 1.] 2
  """
  method = "psmgd"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  update_every = validation.static_int(update_every, "update_every", method,
                                      1)
  validation.check_positive_int(max_iter, "max_iter", method)

  def init_state(dtype):
    return PSMGDState(base.uniform_weights(num_tasks, dtype),
                      jnp.asarray(update_every, jnp.int32),
                      jnp.zeros((), dtype))

  def prepare(state, losses, step):
    del losses
    if step is None or not step.stacked:  # the probe; one ordinary gradient
      return state
    return _solved(step.updates, state, update_every, max_iter, tol)

  def advance(state, losses, coeffs, step):
    del losses, coeffs, step
    return state._replace(
        steps_since_solve=jnp.minimum(state.steps_since_solve + 1,
                                      update_every))

  return base.loss_weighting_transformation(
      num_tasks, method, init_state, lambda state, losses: state.weights,
      advance, prepare)
