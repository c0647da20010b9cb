"""Learned loss weights with a bi-level objective: LDC-MTL and Auto-Lambda.

Both are loss weightings (one backward pass of ``sum_i c_i L_i`` for the
model, :func:`mtl_optax.value_and_weighted_grad`) whose weights are the
parameters of an upper-level problem, stepped by their own optimizer inside
``update``:

* :func:`ldc_mtl`: the weights minimise the discrepancy of the weighted,
  pre-normalised losses, jointly with the model (first order, O(1) in K);
* :func:`auto_lambda`: the weights minimise the held-out loss after a
  look-ahead step of the model (a meta-gradient through one virtual step).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import tree_math
from mtl_optax._src import validation
from mtl_optax._src.loss_weighting import _safe_ratio
from mtl_optax._src.loss_weighting import inner_optimizer
from mtl_optax._src.loss_weighting import renamed_field

__all__ = ("AutoLambdaState", "LDCMTLState", "auto_lambda", "ldc_mtl")


# --------------------------------------------------------------------------
# LDC-MTL.
# --------------------------------------------------------------------------


class LDCMTLState(NamedTuple):
  """State of :func:`ldc_mtl`.

  Attributes:
    weights: ``(K,)`` the loss coefficients ``c = d total / dL`` of the last
      update.
    logits: ``(K,)`` the router's logits (task weights ``w = softmax``).
    logits_opt_state: state of the optimizer that steps the logits.
    initial_losses: ``(K,)`` the first update's losses (the
      pre-normalisation ``r = L(0) / min L(0)``).
    count: ``()`` int32, updates so far (saturating at 1); ``step`` is its
      deprecated name.
  """
  weights: jax.Array
  logits: jax.Array
  logits_opt_state: Any
  initial_losses: jax.Array
  count: jax.Array
  step = renamed_field("count")


def ldc_total_loss(losses: jax.Array, logits: jax.Array,
                   initial_losses: jax.Array,
                   penalty: jax.Array | float) -> jax.Array:
  """LDC-MTL's single objective of the model and the router.

  ``w.Ltilde / sum(w) + penalty sum_i |w_i Ltilde_i - w_{i+1} Ltilde_{i+1}|``
  with ``w = softmax(logits)``, ``Ltilde = L / r``,
  ``r = L(0) / min L(0)`` (all 1 when ``min L(0) <= 0``).
  """
  initial_losses = jax.lax.stop_gradient(initial_losses)  # r is a constant
  ratios = _safe_ratio(initial_losses, jnp.min(initial_losses))
  normalized = losses / ratios
  # At the first step every Ltilde_i is min L(0) in exact arithmetic; make the
  # values exact (the gradient 1 / r_i unchanged) so that the |0| terms of the
  # penalty do not take signs from rounding.
  at_start = jnp.all(initial_losses == losses) & (jnp.min(losses) > 0)
  exact = jnp.where(at_start, jnp.min(losses), normalized)
  normalized = normalized + jax.lax.stop_gradient(exact - normalized)
  w = jax.nn.softmax(logits)
  weighted = w * normalized
  # Equal products differ by exactly 0, as in torch: XLA may contract
  # ``a * b - c * d`` into a fused multiply-add (it does at its default
  # optimisation level, on CPU and GPU), whose unrounded product gives the
  # rounding error of ``c * d`` a sign, and the penalty a gradient of
  # ``+-penalty w_i / r_i`` (the comparison reads the rounded products).
  ahead, behind = weighted[:-1], weighted[1:]
  gaps = jnp.where(ahead == behind, jnp.zeros_like(ahead), ahead - behind)
  # sign(x) x: |x| with derivative 0 at 0, as torch's abs (jnp.abs has 1).
  discrepancy = jnp.sum(jnp.sign(gaps) * gaps)
  return jnp.sum(weighted) / jnp.sum(w) + penalty * discrepancy


def _representable_square(grad: jax.Array) -> jax.Array:
  """``grad`` clipped to ``+-sqrt(finfo.max) / 16``: its square, and so any
  optimizer's second moment, stays finite whatever order XLA evaluates
  ``(1 - b2) g g`` in. Normalised losses are O(1); only losses grown by
  ~1e19 and more (where the router's gradient is rounding noise of a
  saturated softmax) reach the bound."""
  bound = jnp.sqrt(jnp.finfo(grad.dtype).max) / 16
  return jnp.clip(grad, -bound, bound)


def ldc_mtl(num_tasks: int, penalty: float = 0.05,
            learning_rate: float = 1e-3,
            optimizer: Optional[optax.GradientTransformation] = None
            ) -> base.LossWeightingTransformation:
  """LDC-MTL: loss discrepancy control by a bi-level, first-order router.

  Xiao, Dong, Zou & Ji, "LDC-MTL: Balancing Multi-Task Learning through
  Scalable Loss Discrepancy Control" (first version: "Scalable Bilevel Loss
  Balancing for Multi-Task Learning", BiLB4MTL), arXiv:2502.08585. The
  losses are pre-normalised by their first values, ``Ltilde_i = L_i / r_i``,
  ``r = L(0) / min L(0)``; the lower level fits the model to
  ``sum_i w_i Ltilde_i``, the upper level drives the router weights ``w`` to
  equalise the weighted losses, and the first-order penalty form descends
  ONE objective in both,
  ``T = w.Ltilde + lambda sum_i |w_i Ltilde_i - w_{i+1} Ltilde_{i+1}|``
  (``w = softmax``, adjacent pairs, as in the official trainers). The model
  gets ``c = dT/dL`` at the current losses (one backward pass whatever K
  is); the logits take one step of their own optimizer (default
  ``optax.adam(learning_rate)``) on the closed-form ``dT/dxi`` at the same
  point: the joint gradient step of the official code, where one Adam steps
  the model and the router on ``T``.

  .. math::

     T &= w^\\top \\tilde L + \\lambda \\sum_i
     \\big| w_i \\tilde L_i - w_{i+1} \\tilde L_{i+1} \\big|, \\qquad
     w = \\operatorname{softmax}(\\xi), \\\\
     d &= \\sum_i c_i g_i, \\qquad c = \\frac{\\partial T}{\\partial L}

  Deviation: the official router is a layer of the network (a linear map of
  pooled decoder features, then softmax, clamped to [0.2, 0.8] for NYU-v2);
  here it is an input-independent logit vector in the state, so the method
  is a plain optax transformation. ``L(0)`` is the first update's losses
  (official: the first batch). The adjacent-pair penalty makes the method
  depend on the order of the tasks.

  Output scale: ``w`` is on the simplex and ``r >= 1`` (the smallest is 1),
  so equal initial losses and logits give ``g0`` (the official scale, no
  rescaling).

  Args:
    num_tasks: number of tasks K.
    penalty: the discrepancy penalty ``lambda`` (official NYU-v2: 0.05).
      Injectable.
    learning_rate: learning rate of the default Adam on the logits.
      Injectable.
    optimizer: optional optax optimizer for the logits, overriding the Adam.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`LDCMTLState`.

  Example (task 1's loss halves: the router shifts weight to it):
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.ldc_mtl(2, penalty=0.5, learning_rate=0.1)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for losses in ([1., 1.], [1., 0.5], [1., 0.5]):
    ...   _, state = tx.update(params, state, params,
    ...                        task_losses=jnp.array(losses))
    >>> print(np.asarray(jax.nn.softmax(state.logits), np.float64).round(4))
    [0.4206 0.5794]
    >>> print(np.asarray(state.weights, np.float64).round(4))
    [0.6943 0.2686]
  """
  method = "ldc_mtl"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  opt = inner_optimizer(optimizer, learning_rate, method)
  validation.check_nonnegative(penalty, "penalty", method)

  def init_state(dtype):
    logits = jnp.zeros((num_tasks,), dtype)
    return LDCMTLState(base.uniform_weights(num_tasks, dtype), logits,
                       opt.init(logits), jnp.ones((num_tasks,), dtype),
                       jnp.zeros((), jnp.int32))

  def initial(state, losses):
    return jnp.where(state.count == 0, losses, state.initial_losses)

  def total(losses, logits, state):
    return ldc_total_loss(losses, logits, initial(state, losses),
                          jnp.asarray(penalty, losses.dtype))

  def coefficients(state, losses):
    return jax.grad(total)(losses, state.logits, state)

  def advance(state, losses, coeffs, step):
    del step
    grad = _representable_square(
        jax.grad(total, argnums=1)(losses, state.logits, state))
    delta, opt_state = opt.update(grad, state.logits_opt_state, state.logits)
    # A step that overflows the optimizer's moments (losses ~1e19 and up in
    # float32) is skipped, so the router keeps adapting afterwards.
    logits, opt_state = base.keep_if_finite(
        base.all_finite((delta, opt_state)),
        (optax.apply_updates(state.logits, delta), opt_state),
        (state.logits, state.logits_opt_state))
    return LDCMTLState(coeffs, logits, opt_state, initial(state, losses),
                       jnp.minimum(state.count + 1, 1))

  return base.loss_weighting_transformation(num_tasks, method, init_state,
                                            coefficients, advance)


# --------------------------------------------------------------------------
# Auto-Lambda.
# --------------------------------------------------------------------------


class AutoLambdaState(NamedTuple):
  """State of :func:`auto_lambda`.

  Attributes:
    weights: ``(K,)`` the loss coefficients of the last update,
      ``meta_weights / (K weight_init)``.
    meta_weights: ``(K,)`` the meta-learned task weights ``lambda`` on the
      official scale (``weight_init`` each at the start).
    meta_opt_state: state of the optimizer that steps ``lambda``.
  """
  weights: jax.Array
  meta_weights: jax.Array
  meta_opt_state: Any


def _primary_mask(primary_tasks, num_tasks, method):
  if primary_tasks is None:
    return np.ones((num_tasks,), np.float32)
  indices = np.asarray(primary_tasks)
  if (indices.ndim != 1 or indices.size == 0
      or not np.issubdtype(indices.dtype, np.integer)
      or np.any(indices < 0) or np.any(indices >= num_tasks)):
    raise ValueError(f"{method}: primary_tasks must be a non-empty sequence "
                     f"of task indices in [0, {num_tasks}), got "
                     f"{primary_tasks!r}.")
  mask = np.zeros((num_tasks,), np.float32)
  mask[indices] = 1.0
  return mask


def _directional_derivatives(updates, stacked, params, direction, extra_args,
                             num_tasks, method):
  """``<g_i, direction>`` for every task: from the stacked gradients, or one
  forward-mode pass of ``train_loss_fn`` on the single-backward path."""
  if stacked:
    row = jax.tree.map(lambda d: d[None], direction)
    return tree_math.cross_gram_matrix(updates, row)[:, 0]
  train_loss_fn = extra_args.get("train_loss_fn")
  if train_loss_fn is None or not callable(train_loss_fn):
    raise ValueError(
        f"{method}: with one weighted-loss gradient (the single-backward path) "
        "the extra argument train_loss_fn (params -> (K,) training losses on "
        "the current batch) is required, for the per-task derivatives along "
        f"the meta-gradient; or give update stacked ({num_tasks}, ...) "
        "gradients.")
  train_loss_fn = base.guard_loss_fn(train_loss_fn, params, method)
  return jax.jvp(train_loss_fn, (params,), (direction,))[1]


def _meta_step(step, state, opt, mask, virtual_lr, weight_init, method):
  """Auto-Lambda's meta-update of ``lambda``: the virtual step from
  ``step.params`` along ``sum_i lambda_i g_i``, the primary tasks' held-out
  loss there, and one step of ``opt`` on ``-alpha <g_i, grad V(theta')>``.
  Skipped (``state`` kept) when it is not finite."""
  num_tasks = mask.shape[0]
  params, updates, extra_args = step.params, step.updates, step.extra_args
  loss_fn = extra_args.get("loss_fn")
  validation.check_loss_fn(loss_fn, method)
  loss_fn = base.guard_loss_fn(loss_fn, params, method)
  dtype = state.meta_weights.dtype
  lam = state.meta_weights
  if step.stacked:
    virtual_grad = tree_math.weighted_task_sum(lam, updates)
  else:  # the gradient of sum_i c_i L_i, c = lambda / (K weight_init)
    factor = num_tasks * jnp.asarray(weight_init, dtype)
    virtual_grad = jax.tree.map(lambda g: g * factor.astype(g.dtype), updates)
  alpha = jnp.asarray(virtual_lr, dtype)
  moved = jax.tree.map(lambda p, g: p - alpha.astype(p.dtype) * g, params,
                       virtual_grad)
  primary = jnp.asarray(mask, dtype)
  direction = jax.grad(lambda p: jnp.dot(primary, loss_fn(p).astype(dtype))
                       )(moved)
  derivatives = _directional_derivatives(updates, step.stacked, params,
                                         direction, extra_args, num_tasks,
                                         method)
  meta_grad = (-alpha * derivatives.astype(dtype)).astype(dtype)
  delta, opt_state = opt.update(meta_grad, state.meta_opt_state, lam)
  stepped = state._replace(meta_weights=optax.apply_updates(lam, delta),
                           meta_opt_state=opt_state)
  # An overflowing look-ahead (or one that overflows the meta-optimizer's
  # moments) must not poison lambda: skip the meta-update.
  return base.keep_if_finite(base.all_finite(stepped), stepped, state)


def _meta_step_in_order(meta_step):
  """Auto-Lambda's ``prepare`` and ``advance`` rules: on stacked gradients
  the meta-step comes first and the update uses the new weights (the
  official order); on the single-backward path the gradient was taken with
  the current weights, which the state records, then the meta-step."""
  def prepare(state, losses, step):
    del losses
    if step is not None and step.stacked:
      return meta_step(step, state)
    return state

  def advance(state, losses, coeffs, step):
    del losses
    new_state = state._replace(weights=coeffs)
    if not step.stacked:
      new_state = meta_step(step, new_state)
    return new_state

  return prepare, advance


def auto_lambda(num_tasks: int, virtual_lr: float = 0.1,
                meta_lr: float = 1e-4, weight_init: float = 0.1,
                primary_tasks: Optional[Sequence[int]] = None,
                meta_optimizer: Optional[optax.GradientTransformation] = None
                ) -> base.LossWeightingTransformation:
  """Auto-Lambda: task weights meta-learned on held-out data.

  Liu, Johns & Davison, "Auto-Lambda: Disentangling Dynamic Task
  Relationships", TMLR 2022 (official code: lorenmt/auto-lambda; LibMTL does
  not ship it). Each update first takes a virtual step of the model,
  ``theta' = theta - alpha sum_i lambda_i g_i``, evaluates the primary tasks'
  held-out loss ``V = sum_{i in P} L_i^val(theta')`` (extra argument
  ``loss_fn``: params -> (K,) held-out losses), and steps ``lambda`` with its
  own optimizer (official: Adam, lr 1e-4) on the one-step meta-gradient
  ``dV/dlambda_i = -alpha <g_i, grad V(theta')>``; the model update then uses
  the new weights.

  .. math::

     \\theta' &= \\theta - \\alpha \\sum_i \\lambda_i g_i, \\qquad
     V = \\sum_{i \\in P} L_i^{\\mathrm{val}}(\\theta'), \\\\
     \\frac{\\partial V}{\\partial \\lambda_i} &= -\\alpha
     \\langle g_i, \\nabla V(\\theta') \\rangle

  The per-task derivatives ``<g_i, grad V(theta')>`` come from the stacked
  gradients when ``update`` gets them (exact), or on the single-backward path
  from one forward-mode pass of the extra argument ``train_loss_fn`` (params
  -> (K,) training losses of the current batch; also exact). The official
  code takes the central difference of the training losses at
  ``theta +- eps d`` with ``eps = 0.01 / ||d||``, which equals them for
  quadratic losses and differs by ``O(eps^2)`` otherwise.

  Deviations and timing: the official virtual step adds the model
  optimizer's momentum buffer and weight decay to the gradient; here it is a
  plain step of size ``virtual_lr`` (set it to the model's learning rate; the
  official code uses the scheduler's current one). On the single-backward
  path the gradient ``update`` receives was taken with the weights before
  this step's meta-update, so the model step is one meta-update behind the
  official trainer (which takes a second backward pass); with stacked
  gradients the order is the official one. A non-finite meta-gradient (a
  look-ahead that overflows, a NaN held-out loss) skips the meta-update, as
  GradNorm's weights do; a non-finite gradient or loss still makes the model
  update NaN.

  Output scale: ``c = lambda / (K weight_init)``: ``g0`` at the start. The
  official trainer descends ``sum_i lambda_i L_i``, ``optax.scale(num_tasks
  * weight_init)`` away; ``meta_weights`` holds ``lambda`` on its scale.

  Args:
    num_tasks: number of tasks K.
    virtual_lr: ``alpha``, the virtual step's learning rate (official: the
      model's learning rate, 0.1 in the dense trainers). Injectable.
    meta_lr: learning rate of the default Adam on ``lambda`` (official
      ``--autol_lr`` 1e-4). Injectable.
    weight_init: the initial ``lambda`` (official ``--autol_init`` 0.1;
      > 0).
    primary_tasks: indices of the tasks whose held-out loss is minimised
      (default all, the official multi-task setting).
    meta_optimizer: optional optax optimizer for ``lambda``, overriding the
      Adam.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`AutoLambdaState`.

  Example (held-out data only for task 0: its weight grows):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.auto_lambda(2, virtual_lr=0.1, meta_lr=0.01, weight_init=0.5)
    >>> targets = jnp.array([[1., 0.], [0., 1.]])
    >>> losses_fn = lambda p: 0.5 * jnp.sum((p - targets) ** 2, axis=1)
    >>> val_fn = lambda p: 0.5 * jnp.sum((p - targets[0]) ** 2) * jnp.ones(2)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> grads = mo.value_and_task_grads(losses_fn)(params)[1]
    >>> update, state = tx.update(grads, state, params,
    ...                           task_losses=losses_fn(params), loss_fn=val_fn)
    >>> print(np.asarray(state.meta_weights, np.float64).round(4))
    [0.51 0.49]
  """
  method = "auto_lambda"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  for name, value in (("virtual_lr", virtual_lr), ("meta_lr", meta_lr)):
    validation.check_nonnegative(value, name, method)
  validation.check_positive(weight_init, "weight_init", method)
  mask = _primary_mask(primary_tasks, num_tasks, method)
  opt = meta_optimizer if meta_optimizer is not None else optax.adam(meta_lr)

  def init_state(dtype):
    meta = jnp.full((num_tasks,), weight_init, dtype)
    return AutoLambdaState(base.uniform_weights(num_tasks, dtype), meta,
                           opt.init(meta))

  def coefficients(state, losses):
    return state.meta_weights / (num_tasks * jnp.asarray(weight_init,
                                                         losses.dtype))

  prepare, advance = _meta_step_in_order(functools.partial(
      _meta_step, opt=opt, mask=mask, virtual_lr=virtual_lr,
      weight_init=weight_init, method=method))
  return base.loss_weighting_transformation(
      num_tasks, method, init_state, coefficients, advance, prepare,
      requires_params="the virtual step starts from them")
