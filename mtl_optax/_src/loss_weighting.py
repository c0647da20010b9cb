"""Loss weightings: per-task coefficients from the losses, one backward pass.

Every method here (except :func:`db_mtl`) is a
:class:`~mtl_optax.LossWeightingTransformation`: its coefficients ``c`` depend
only on its own state and the current task losses, so the training step takes
the gradient of ONE weighted loss ``sum_i c_i L_i`` (one forward and one
backward pass whatever K is)::

    famo = mo.famo(num_tasks=3)
    tx = optax.chain(famo, optax.adam(1e-3))
    opt_state = tx.init(params)
    losses, grads = mo.value_and_weighted_grad(task_losses, tx)(
        opt_state, params, batch)         # the whole tx and its state
    updates, opt_state = tx.update(grads, opt_state, params, task_losses=losses)

``update`` hands that ordinary gradient through and advances the method's
state (learnable log-variances, logits, loss history) from ``task_losses``.
Given stacked per-task gradients instead (leaves ``(K, *shape)``, e.g. from
:func:`mtl_optax.value_and_task_grads`) it returns ``sum_i c_i g_i`` with the
same coefficients: both paths give the same update and the same state.

Common contract:

* ``task_losses`` (shape ``(K,)``) is a required extra argument of ``update``;
  a missing one, or one of the wrong shape, is a trace-time ``ValueError``.
  ``update(..., weighting_probe=True)`` answers with the state's ``weights``
  set to the coefficients of this step, nothing advanced: the probe
  :func:`mtl_optax.value_and_weighted_grad` makes through the whole chain
  (``tx.loss_weights(state, losses)`` is that probe of the bare method).
* The state's ``weights`` field holds the coefficients ``c`` of the last
  update (``update = sum_i weights[i] g_i``).
* Non-finite losses or gradients give a non-finite update (so that
  ``optax.apply_if_finite`` downstream skips the step) and leave the state
  unchanged.
* Methods built on logarithms or ratios of losses assume positive losses, as
  their papers do; finite losses ``<= 0`` never give NaN: they are clamped at
  0 and a small ``eps`` is added (documented per method).
* On stacked gradients ``sum_i c_i g_i`` is accumulated in float32 or wider
  and returned in the gradients' dtype. Where reciprocal-loss coefficients
  (``1 / (L + eps)`` for a zero loss) would overflow that dtype (float16, or
  float32 with |g| ~ 1e19), all coefficients are scaled down by one factor:
  the direction is kept, the update stays finite, and ``weights`` records
  the scaled coefficients.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import prng
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = (
    "DBMTLState",
    "DWAState",
    "FAMOState",
    "GradNormState",
    "LearnedScaleState",
    "LossWeightsState",
    "RLWState",
    "RandomWeightingState",
    "STCHState",
    "db_mtl",
    "dwa",
    "famo",
    "gls",
    "gradnorm",
    "imtl_l",
    "random_loss_weighting",
    "random_weighting",
    "scale_invariant",
    "stch",
    "uncertainty_weighting",
)

# Default bound on learnable log-scales (UW's log-variances, IMTL-L's
# scales): a loss of 0 or below gives the scale objective no minimum and
# drives s to the bound, so it caps that task's weight at about e^10 = 2.2e4.
_LOG_SCALE_BOUND = 10.0


# --------------------------------------------------------------------------
# Shared machinery.
# --------------------------------------------------------------------------


def renamed_field(new: str) -> property:
  """A read-only state attribute under a field's old name, warning that it is
  deprecated (the field itself is ``new``)."""
  def getter(self):
    old = next(name for name, value in vars(type(self)).items()
               if value is prop)
    warnings.warn(f"{type(self).__name__}.{old} is deprecated: read .{new}.",
                  DeprecationWarning, stacklevel=2)
    return getattr(self, new)
  prop = property(getter)
  return prop


def _running_mean(mean: jax.Array, value: jax.Array, count: jax.Array
                  ) -> jax.Array:
  """Mean of ``count + 1`` values from the mean of the first ``count``;
  written so that it cannot overflow for finite inputs."""
  count = count.astype(mean.dtype)
  return mean * (count / (count + 1)) + value / (count + 1)


def _positive(losses: jax.Array, eps: Any) -> jax.Array:
  """``max(L, 0) + eps`` (and at least the smallest normal float): the guarded
  argument of a log or a reciprocal."""
  return jnp.maximum(jnp.maximum(losses, 0.0) + jnp.asarray(eps, losses.dtype),
                     jnp.finfo(losses.dtype).tiny)


def _exp_finite(log_value: jax.Array) -> jax.Array:
  """``exp`` with the exponent capped at ``log(finfo.max)``: finite weights."""
  cap = jnp.log(jnp.finfo(log_value.dtype).max)
  return jnp.exp(jnp.minimum(log_value, cap))


def _safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """``num / den`` where ``den > 0``, else 1; clipped to the finite range."""
  big = jnp.finfo(num.dtype).max
  ratio = num / jnp.where(den > 0, den, 1.0)
  return jnp.where(den > 0, jnp.clip(ratio, -big, big), 1.0)


def inner_optimizer(optimizer: Optional[optax.GradientTransformation],
                    learning_rate: Any, method: str
                    ) -> optax.GradientTransformation:
  """The optimizer of a method's own learnable weights: ``optimizer``, or
  ``optax.adam(learning_rate)`` (``learning_rate`` checked >= 0)."""
  validation.check_nonnegative(learning_rate, "learning_rate", method)
  return optimizer if optimizer is not None else optax.adam(learning_rate)


class LossWeightsState(NamedTuple):
  """State of :func:`gls` and :func:`scale_invariant` (no memory).

  Attributes:
    weights: ``(K,)`` coefficients of the last update.
  """
  weights: jax.Array


def _memoryless(num_tasks, method, rule):
  def init_state(dtype):
    return LossWeightsState(base.uniform_weights(num_tasks, dtype))

  def advance(state, losses, coeffs, step):
    del state, losses, step
    return LossWeightsState(coeffs)

  return base.loss_weighting_transformation(
      num_tasks, method, init_state, lambda state, losses: rule(losses),
      advance)


# --------------------------------------------------------------------------
# Learnable loss scales: uncertainty weighting and IMTL-L.
# --------------------------------------------------------------------------


class LearnedScaleState(NamedTuple):
  """State of :func:`uncertainty_weighting` and :func:`imtl_l`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update.
    log_scales: ``(K,)`` the learnable log-scales ``s`` (UW: log-variances
      ``log sigma^2``; IMTL-L: the scale exponents).
    log_scales_opt_state: state of the optimizer that steps ``log_scales``.
  """
  weights: jax.Array
  log_scales: jax.Array
  log_scales_opt_state: Any


def _learned_scale(num_tasks, method, init_log_scale, learning_rate, optimizer,
                   coefficient_fn, scale_grad_fn, log_scale_bound):
  """``c = coefficient_fn(s) / K`` (the paper's loss-sum weights at the mean
  scale); ``s`` takes one optimizer step per update on
  ``scale_grad_fn(s, coefficient_fn(s), losses)``, the closed-form derivative
  of the method's objective with respect to ``s`` (no extra backward pass),
  and is clipped to ``[-log_scale_bound, log_scale_bound]``."""
  validation.check_positive(log_scale_bound, "log_scale_bound", method)
  opt = inner_optimizer(optimizer, learning_rate, method)

  def init_state(dtype):
    s = jnp.full((num_tasks,), init_log_scale, dtype)
    return LearnedScaleState(coefficient_fn(s) / num_tasks, s, opt.init(s))

  def coefficients(state, losses):
    del losses
    return coefficient_fn(state.log_scales) / num_tasks

  def advance(state, losses, coeffs, step):
    del step
    s = state.log_scales
    grad = scale_grad_fn(s, coefficient_fn(s), losses).astype(s.dtype)
    delta, opt_state = opt.update(grad, state.log_scales_opt_state, s)
    bound = jnp.asarray(log_scale_bound, s.dtype)
    new_s = jnp.clip(optax.apply_updates(s, delta), -bound, bound)
    # One huge loss (>~ 3e19 in float32) overflows Adam's second moment and
    # would freeze s for ever: such an inner step is skipped, s and the
    # optimizer state are kept (the model update still takes this step).
    ok = base.all_finite(opt_state) & base.all_finite(new_s)
    new_s, opt_state = base.keep_if_finite(ok, (new_s, opt_state),
                                           (s, state.log_scales_opt_state))
    return LearnedScaleState(coeffs, new_s, opt_state)

  return base.loss_weighting_transformation(num_tasks, method, init_state,
                                            coefficients, advance)


def uncertainty_weighting(
    num_tasks: int, learning_rate: float = 0.025,
    init_log_variance: float = -0.5,
    optimizer: Optional[optax.GradientTransformation] = None,
    log_scale_bound: float = _LOG_SCALE_BOUND,
) -> base.LossWeightingTransformation:
  """Uncertainty weighting (UW): learnable homoscedastic task uncertainties.

  Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
  Losses for Scene Geometry and Semantics", CVPR 2018. Jointly minimises
  ``sum_i L_i / (2 exp(s_i)) + s_i / 2`` over the model and the log-variances
  ``s_i = log sigma_i^2`` (LibMTL's form): the paper's loss weights are
  ``1 / (2 exp(s_i))``, here divided by K (see the output scale).

  .. math::

     \\min_{\\theta, s} \\sum_i \\frac{L_i}{2 e^{s_i}} + \\frac{s_i}{2}, \\qquad
     d = \\sum_i c_i g_i, \\qquad c_i = \\frac{1}{2 K e^{s_i}}

  The log-variances live in the state, not among the model parameters: each
  ``update`` takes one step of their own optimizer (default
  ``optax.adam(learning_rate)``) on the closed-form derivative
  ``d/ds_i = 1/2 - L_i / (2 exp(s_i))`` at the same point as the model's gradient, i.e.
  the joint gradient step of the paper, with no second backward pass and no
  extra parameters for the user to carry.

  Guards: ``s`` is clipped to ``[-log_scale_bound, log_scale_bound]``
  (default 10). A zero or negative loss gives the objective no minimum in
  ``s`` (the weight ``1/(2L)`` would grow without end); the clip caps that
  task's weight at ``e^10 / 2 ~ 1.1e4`` (the ``s`` optimum ``log 2L`` is
  followed down to losses of about ``2.3e-5``). A non-finite step of the
  inner optimizer (a loss above ~3e19 overflows Adam's second moment in
  float32) is skipped: ``s`` and its optimizer state are kept, so the weights
  keep adapting after a spike.

  Output scale: the mean-gradient scale: ``c_i = 1 / (2 K sigma_i^2)``, the
  paper's weights ``1 / (2 sigma_i^2)`` divided by K (at ``s = log 2`` every
  ``c_i`` is ``1/K`` and the update is ``g0``; at the LibMTL start
  ``s = -0.5`` it is about ``0.82 g0``). The paper's (and LibMTL's) scale is
  ``optax.scale(num_tasks)`` away. The log-variances follow the paper's
  objective exactly (``d/ds_i = 1/2 - L_i / (2 sigma_i^2)``); only the
  model's coefficients carry the ``1/K``.

  Args:
    num_tasks: number of tasks K.
    learning_rate: learning rate of the default Adam on ``s`` (0.025 is the
      ``--method-params-lr`` of the Nash-MTL / FAMO trainers; LibMTL instead
      trains ``s`` with the model's optimizer). Injectable.
    init_log_variance: initial ``s`` (LibMTL: -0.5; Nash-MTL: 0).
    optimizer: optional optax optimizer for ``s``, overriding the default
      Adam (e.g. ``optax.sgd(lr)`` to mirror the model's optimizer).
    log_scale_bound: bound on ``|s|`` (> 0). Injectable.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`LearnedScaleState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.uncertainty_weighting(2, learning_rate=0.1)
    >>> grad, params = jnp.array([1., 1.]), jnp.zeros(2)
    >>> state = tx.init(params)
    >>> losses = jnp.array([4., .25])
    >>> for _ in range(3):
    ...   _, state = tx.update(grad, state, params, task_losses=losses)
    >>> c = tx.loss_weights(state, losses)
    >>> print(np.asarray(state.log_scales, np.float64).round(4),
    ...       np.asarray(c, np.float64).round(4))
    [-0.2018 -0.7989] [0.3059 0.5558]
  """
  method = "uncertainty_weighting"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  return _learned_scale(
      num_tasks, method, init_log_variance, learning_rate, optimizer,
      coefficient_fn=lambda s: 0.5 * jnp.exp(-s),
      scale_grad_fn=lambda s, c, losses: 0.5 - c * losses,
      log_scale_bound=log_scale_bound)


def imtl_l(
    num_tasks: int, learning_rate: float = 0.025,
    optimizer: Optional[optax.GradientTransformation] = None,
    log_scale_bound: float = _LOG_SCALE_BOUND,
) -> base.LossWeightingTransformation:
  """IMTL-L: loss balancing by learnable scales, the loss half of IMTL.

  Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021. Each loss
  is replaced by ``exp(s_i) L_i - s_i``, minimised jointly over the model and
  ``s``; its minimum in ``s`` makes every scaled loss equal to 1. The model
  gradient is ``sum_i c_i g_i`` with ``c_i = exp(s_i) / K``; ``s`` (initially
  0, as in the paper and LibMTL) takes one step of its own optimizer per
  update on ``d/ds_i = exp(s_i) L_i - 1``.

  .. math::

     \\min_{\\theta, s} \\sum_i e^{s_i} L_i - s_i, \\qquad
     d = \\sum_i c_i g_i, \\qquad c_i = \\frac{e^{s_i}}{K}

  Guards: ``s`` is clipped to ``[-log_scale_bound, log_scale_bound]``
  (default 10): a zero or negative loss (no minimum in ``s``) caps that
  task's weight at ``e^10 ~ 2.2e4``; the optimum ``-log L`` is followed down
  to losses of about ``4.5e-5``. A non-finite inner optimizer step (a loss
  above ~3e19 in float32) is skipped, ``s`` and its optimizer state kept.

  Output scale: the mean-gradient scale: ``c_i = exp(s_i) / K``, all ``1/K``
  at the start (``g0``). The paper's weights ``exp(s_i)`` (the loss sum at
  the start) are ``optax.scale(num_tasks)`` away; ``s`` follows the paper's
  objective unchanged.

  Args:
    num_tasks: number of tasks K.
    learning_rate: learning rate of the default Adam on ``s``. Injectable.
    optimizer: optional optax optimizer for ``s``, overriding the Adam.
    log_scale_bound: bound on ``|s|`` (> 0). Injectable.

  Returns:
    A loss weighting (:class:`~mtl_optax.LossWeightingTransformation`)
    whose state is a :class:`LearnedScaleState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx, params = mo.imtl_l(2, learning_rate=0.1), jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for losses in ([2., .5], [1.5, .5]):  # s moves towards -log L
    ...   _, state = tx.update(jnp.ones(2), state, params,
    ...                        task_losses=jnp.array(losses))
    >>> print(np.asarray(state.log_scales, np.float64).round(4),
    ...       np.asarray(tx.loss_weights(state, jnp.array([1.5, .5])),
    ...                  np.float64).round(4))
    [-0.1881  0.1996] [0.4142 0.6104]
  """
  method = "imtl_l"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  return _learned_scale(
      num_tasks, method, 0.0, learning_rate, optimizer,
      coefficient_fn=jnp.exp,
      scale_grad_fn=lambda s, c, losses: c * losses - 1.0,
      log_scale_bound=log_scale_bound)


# --------------------------------------------------------------------------
# Dynamic Weight Average.
# --------------------------------------------------------------------------


class DWAState(NamedTuple):
  """State of :func:`dwa`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update (they sum to 1).
    loss_history: ``(2, K)`` mean losses of the last two complete periods,
      older first.
    loss_mean: ``(K,)`` running mean of the losses of the current period.
    count: ``()`` int32, updates taken in the current period (back to 0
      when it completes); ``period_step`` is its deprecated name.
    num_periods: ``()`` int32, complete periods so far, saturating at 2.
  """
  weights: jax.Array
  loss_history: jax.Array
  loss_mean: jax.Array
  count: jax.Array
  num_periods: jax.Array
  period_step = renamed_field("count")


@deprecation.renamed_arguments(period="update_every")
def dwa(num_tasks: int, temperature: float = 2.0, update_every: int = 1
        ) -> base.LossWeightingTransformation:
  """Dynamic Weight Average (DWA): weights from the rate of loss descent.

  Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention",
  CVPR 2019 (MTAN), eq. 7. With ``Lbar_i(p)`` the mean loss of task i over
  period ``p`` (the paper's epoch):
  ``w_i = Lbar_i(p-1) / Lbar_i(p-2)``, ``c_i = softmax(w / T)_i``;
  ``c = 1/K`` for the first two periods. ``update_every`` is the number of
  steps averaged into one ``Lbar`` (static): set it to the number of steps per
  epoch to reproduce the paper and LibMTL, or leave 1 to compare the losses
  of the last two steps. Weights change only when a period completes.
  ``Lbar`` is the plain mean of the period's step losses; LibMTL's epoch loss
  weights each batch by its size (they differ when the last batch is short).

  .. math::

     d = \\sum_i c_i g_i, \\qquad c = \\operatorname{softmax}(w / T), \\qquad
     w_i = \\frac{\\bar L_i(p - 1)}{\\bar L_i(p - 2)}

  Guards: a task whose previous mean loss is ``<= 0`` gets ratio 1; ratios
  are clipped to the finite range, so ``softmax`` never sees ``inf``.

  Output scale: the mean-gradient scale: the weights sum to 1 (equal
  weights give ``g0``). The paper's weights ``K softmax(w / T)`` (summing to
  K, the loss sum) are ``optax.scale(num_tasks)`` away.

  Args:
    num_tasks: number of tasks K.
    temperature: softmax temperature T (paper and LibMTL: 2). Injectable.
    update_every: steps per averaging period (static int >= 1; formerly
      ``period``, a deprecated alias).

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with :class:`DWAState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.dwa(2, temperature=2.0)
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> for losses in ([1., 1.], [0.5, 1.]):
    ...   _, state = tx.update(params, state, params,
    ...                        task_losses=jnp.array(losses))
    >>> print(np.asarray(tx.loss_weights(state, jnp.array([0.4, 1.])),
    ...                  np.float64).round(4))
    [0.4378 0.5622]
  """
  method = "dwa"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive(temperature, "temperature", method)
  update_every = validation.static_int(update_every, "update_every", method, 1)

  def init_state(dtype):
    return DWAState(base.uniform_weights(num_tasks, dtype),
                    jnp.ones((2, num_tasks), dtype),
                    jnp.zeros((num_tasks,), dtype),
                    jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  def coefficients(state, losses):
    del losses
    older, newer = state.loss_history[0], state.loss_history[1]
    big = jnp.finfo(older.dtype).max
    ratio = _safe_ratio(newer, older) / jnp.asarray(temperature, older.dtype)
    dynamic = jax.nn.softmax(jnp.clip(ratio, -big, big))
    return jnp.where(state.num_periods >= 2, dynamic,
                     base.uniform_weights(num_tasks, dynamic.dtype))

  def advance(state, losses, coeffs, step):
    del step
    loss_mean = _running_mean(state.loss_mean, losses, state.count)
    count = state.count + 1
    done = count >= update_every
    history = jnp.stack([state.loss_history[1], loss_mean])
    return DWAState(
        coeffs,
        jnp.where(done, history, state.loss_history),
        jnp.where(done, jnp.zeros_like(loss_mean), loss_mean),
        jnp.where(done, 0, count),
        jnp.where(done, jnp.minimum(state.num_periods + 1, 2),
                  state.num_periods))

  return base.loss_weighting_transformation(num_tasks, method, init_state,
                                            coefficients, advance)


# --------------------------------------------------------------------------
# GradNorm.
# --------------------------------------------------------------------------


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`.

  Attributes:
    weights: ``(K,)`` the loss weights the last update used (``w / K``).
    task_weights: ``(K,)`` the paper's learnable weights ``w`` (sum K) after
      the last GradNorm step: the next update's loss weights are ``w / K``.
    initial_losses: ``(K,)`` ``L_i(0)``, the losses of the first update.
    count: ``()`` int32, updates so far (saturating at 1); ``step`` is its
      deprecated name.
    task_weights_opt_state: state of the optimizer that steps ``w``.
  """
  weights: jax.Array
  task_weights: jax.Array
  initial_losses: jax.Array
  count: jax.Array
  task_weights_opt_state: Any
  step = renamed_field("count")


def _gradnorm_task_norms(step: base.LossStep, num_tasks: int,
                         method: str) -> jax.Array:
  """GradNorm's per-task norms ``n_i``: of ``layer_grads`` if given, else of
  the stacked updates; a clear error on the single-backward path without
  ``layer_grads``."""
  layer = step.extra_args.get("layer_grads")
  if layer is not None:
    validation.check_task_axis(layer, num_tasks, method, what="layer_grads")
    return tree_math.task_norms(layer)
  if step.stacked:
    return tree_math.task_norms(step.updates)
  raise ValueError(
      f"{method}: per-task gradient norms are needed. On the single-backward "
      "path pass the extra argument layer_grads (stacked per-task gradients "
      f"of the unweighted losses w.r.t. a shared layer, leaves ({num_tasks}, "
      "...)), or give update stacked per-task gradients.")


def _gradnorm_advance(state: GradNormState, losses: jax.Array,
                      coeffs: jax.Array, norms: jax.Array,
                      opt: optax.GradientTransformation,
                      alpha: Any) -> GradNormState:
  """One GradNorm step of the weights ``w``: the optimizer on
  ``sign(G_i - Gbar r_i^alpha) n_i``, clipped at 0, renormalised to sum K;
  skipped (``state`` kept) when it is not finite."""
  w = state.task_weights
  num_tasks = w.shape[0]
  dtype = w.dtype
  norms = norms.astype(dtype)
  initial = jnp.where(state.count == 0, losses, state.initial_losses)
  ltilde = _safe_ratio(jnp.maximum(losses, 0.0), initial)
  mean_l = jnp.mean(ltilde)
  r = jnp.where(mean_l > 0, ltilde / jnp.where(mean_l > 0, mean_l, 1.0), 1.0)
  g = w * norms
  target = jnp.mean(g) * r ** jnp.asarray(alpha, dtype)
  grad = jnp.sign(g - target) * norms  # d L_grad / d w, target constant
  delta, opt_state = opt.update(grad, state.task_weights_opt_state, w)
  w_new = jnp.maximum(optax.apply_updates(w, delta), 0.0)
  total = jnp.sum(w_new)
  w_new = jnp.where(total > 0, num_tasks * w_new / jnp.where(
      total > 0, total, 1.0), jnp.ones_like(w_new))
  new_state = GradNormState(coeffs, w_new, initial,
                            jnp.minimum(state.count + 1, 1), opt_state)
  # Non-finite layer gradients (possible even when the update is finite,
  # layer_grads being a separate input) must not poison w: keep the state.
  # Nor may huge finite norms (>~ 2e19 in float32), which overflow Adam's
  # second moment and would freeze w for ever: that inner step is skipped.
  ok = (jnp.all(jnp.isfinite(norms)) & base.all_finite(opt_state)
        & base.all_finite(w_new))
  return base.keep_if_finite(ok, new_state, state)


def gradnorm(
    num_tasks: int, alpha: float = 1.5, learning_rate: float = 0.025,
    optimizer: Optional[optax.GradientTransformation] = None,
) -> base.LossWeightingTransformation:
  """GradNorm: balance the gradient norms of a shared layer.

  Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization
  for Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018. The
  model takes ``sum_i (w_i / K) g_i``; then, with ``n_i = ||grad_W L_i||``
  for the
  chosen shared layer W, ``G_i = w_i n_i``, ``Gbar = mean_i G_i``,
  ``r_i = Ltilde_i / mean(Ltilde)``, ``Ltilde_i = L_i(t) / L_i(0)``, the
  weights take one optimizer step on
  ``L_grad = sum_i |G_i - Gbar r_i^alpha|`` (the target held constant), i.e.
  on ``d L_grad / d w_i = sign(G_i - Gbar r_i^alpha) n_i``, are clipped at 0
  and renormalised to sum to K.

  .. math::

     d &= \\sum_i \\frac{w_i}{K} g_i, \\qquad
     L_{\\mathrm{grad}} = \\sum_i \\big| w_i n_i - \\bar G\\, r_i^\\alpha \\big|, \\\\
     \\bar G &= \\frac{1}{K} \\sum_i w_i n_i, \\qquad
     r_i = \\frac{\\tilde L_i}{\\operatorname{mean}(\\tilde L)}, \\qquad
     \\tilde L_i = \\frac{L_i(t)}{L_i(0)}

  Per-task norms ``n_i`` (the extra input GradNorm needs):

  * extra argument ``layer_grads``: stacked per-task gradients (leaves
    ``(K, ...)``) of the UNWEIGHTED losses with respect to the layer W (the
    paper: the last shared layer's weights) or to the shared representation
    (LibMTL's ``rep_grad``). Cheap: K backward passes through the heads only,
    e.g. ``mo.value_and_task_grads(lambda z: heads_losses(params, z))(z)``.
    It is what the single-backward path
    (:func:`mtl_optax.value_and_weighted_grad`) needs;
  * otherwise, with stacked per-task gradients as ``updates``, the norms of
    the whole stacked tree (inside ``optax.partition``: the shared leaves).

  ``L_i(0)`` is the first update's losses (the paper's ``t = 0``; LibMTL uses
  the first epoch's mean and starts balancing at epoch 1). Guards:
  ``Ltilde_i = max(L_i, 0) / L_i(0)`` (1 when ``L_i(0) <= 0``), ``r = 1`` when
  every ``Ltilde`` is 0, and equal weights if every weight is clipped to 0.
  LibMTL parametrises the weights as ``K softmax(logits)`` (no clipping), and
  in representation mode it sums the per-task feature gradients over the
  batch before taking norms (pass ``layer_grads`` summed over the batch axis,
  ``rep.sum(1)``, to reproduce it).
  A step of the weights' optimizer that is not finite (gradient norms above
  ~2e19 overflow Adam's second moment in float32) or that meets non-finite
  layer gradients is skipped: ``w`` and its optimizer state are kept, so
  the weights keep adapting after a spike.

  Output scale: the mean-gradient scale: the model's coefficients are
  ``w / K`` (summing to 1, so equal weights give ``g0``). The paper's
  weights ``w`` (summing to K; ``state.task_weights``) are
  ``optax.scale(num_tasks)`` away; their GradNorm dynamics are the paper's
  (the balance ``G_i = w_i n_i`` is unchanged by the common factor).

  Args:
    num_tasks: number of tasks K.
    alpha: strength of the restoring force (paper and LibMTL: 1.5).
      Injectable.
    learning_rate: learning rate of the default Adam on ``w``. Injectable.
    optimizer: optional optax optimizer for ``w`` (e.g. ``optax.sgd(lr)``, the
      paper's plain gradient step), overriding the Adam.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`GradNormState`.

  Example (two tasks; task 0's layer gradient is 4x larger):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.gradnorm(2, alpha=1.5, learning_rate=0.1)
    >>> layer = jnp.array([[4., 0.], [0., 1.]])  # (K, ...) per-task grads
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for _ in range(3):
    ...   update, state = tx.update(layer, state, params,
    ...                             task_losses=jnp.array([1., 1.]))
    >>> print(np.asarray(state.task_weights, np.float64).round(4),
    ...       np.asarray(update, np.float64).round(4))
    [0.7 1.3] [1.6 0.6]
  """
  method = "gradnorm"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(alpha, "alpha", method)
  opt = inner_optimizer(optimizer, learning_rate, method)

  def init_state(dtype):
    w = jnp.ones((num_tasks,), dtype)
    return GradNormState(w / num_tasks, w, jnp.ones((num_tasks,), dtype),
                         jnp.zeros((), jnp.int32), opt.init(w))

  def advance(state, losses, coeffs, step):
    norms = _gradnorm_task_norms(step, num_tasks, method)
    return _gradnorm_advance(state, losses, coeffs, norms, opt, alpha)

  return base.loss_weighting_transformation(
      num_tasks, method, init_state,
      lambda state, losses: state.task_weights / num_tasks, advance)


# --------------------------------------------------------------------------
# FAMO.
# --------------------------------------------------------------------------


class FAMOState(NamedTuple):
  """State of :func:`famo`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update (on the simplex).
    logits: ``(K,)`` the logits ``xi`` (task weights ``z = softmax(xi)``),
      before the pending step that the next losses trigger.
    logits_opt_state: state of the logits' Adam (with ``weight_decay``).
    prev_losses: ``(K,)`` the losses of the last update.
    count: ``()`` int32, updates so far (saturating at 1); ``step`` is its
      deprecated name.
  """
  weights: jax.Array
  logits: jax.Array
  logits_opt_state: Any
  prev_losses: jax.Array
  count: jax.Array
  step = renamed_field("count")


def _famo_log_gap(losses: jax.Array, min_losses: Any, eps: Any
                  ) -> jax.Array:
  """``log D = log(max(L - Lmin, 0) + eps)``."""
  lmin = (jnp.zeros_like(losses) if min_losses is None
          else jnp.asarray(min_losses, losses.dtype))
  return jnp.log(_positive(losses - lmin, eps))


def _famo_pending_logits(state: FAMOState, delta: jax.Array,
                         logits_opt: optax.GradientTransformation
                         ) -> tuple[jax.Array, Any]:
  """The logit step for the move that took ``L_{t-1}`` to ``L_t``, ``delta
  = log D(L_{t-1}) - log D(L_t)`` (none at ``t = 0``): logits and their
  optimizer state."""
  z = jax.nn.softmax(state.logits)
  grad = z * (delta - jnp.dot(z, delta))  # J_softmax(xi)^T delta
  step, opt_state = logits_opt.update(grad, state.logits_opt_state,
                                      state.logits)
  logits = optax.apply_updates(state.logits, step)
  first = state.count == 0
  return (jnp.where(first, state.logits, logits),
          jax.tree.map(lambda new, old: jnp.where(first, old, new),
                       opt_state, state.logits_opt_state))


def _famo_transformation(num_tasks: int, method: str,
                         logits_opt: optax.GradientTransformation,
                         min_losses: Any, eps: Any
                         ) -> base.LossWeightingTransformation:
  """FAMO's rules: the pending logit step (``prepare``), ``c = softmax(log z
  - log D)`` and the loss memory."""
  def init_state(dtype):
    logits = jnp.zeros((num_tasks,), dtype)
    return FAMOState(base.uniform_weights(num_tasks, dtype), logits,
                     logits_opt.init(logits), jnp.ones((num_tasks,), dtype),
                     jnp.zeros((), jnp.int32))

  def log_gap(losses):
    return _famo_log_gap(losses, min_losses, eps)

  def prepare(state, losses, step):
    # The pending logit step, taken once per update (coefficients and
    # advance below read its result).
    del step
    logits, opt_state = _famo_pending_logits(state, log_gap(state.prev_losses)
                                             - log_gap(losses), logits_opt)
    return state._replace(logits=logits, logits_opt_state=opt_state)

  def coefficients(prepared, losses):
    # z_i / D_i normalised, in log space so that 1/D cannot overflow.
    return jax.nn.softmax(jax.nn.log_softmax(prepared.logits)
                          - log_gap(losses))

  def advance(prepared, losses, coeffs, step):
    del step
    return FAMOState(coeffs, prepared.logits, prepared.logits_opt_state,
                     losses, jnp.minimum(prepared.count + 1, 1))

  return base.loss_weighting_transformation(num_tasks, method, init_state,
                                            coefficients, advance, prepare)


@deprecation.renamed_arguments(w_lr="learning_rate", gamma="weight_decay")
def famo(num_tasks: int, learning_rate: float = 0.025,
         weight_decay: float = 1e-3,
         min_losses: Optional[Sequence[float] | jax.Array] = None,
         eps: float = 1e-8) -> base.LossWeightingTransformation:
  """FAMO: Fast Adaptive Multitask Optimization, O(1) space and time.

  Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
  NeurIPS 2023. With ``D_i = L_i - Lmin_i + eps`` and ``z = softmax(xi)``, the
  model descends ``sum_i z_i log D_i / sum_j (z_j / D_j)``, i.e.
  ``c_i = (z_i / D_i) / sum_j (z_j / D_j)`` (on the simplex); the logits take
  one Adam step (``learning_rate``, L2 ``weight_decay`` added to the gradient
  as in ``torch.optim.Adam``) on ``J_softmax(xi)^T delta`` with
  ``delta_i = log D_i(before step) - log D_i(after step)``. One backward pass
  per step whatever K is (:func:`mtl_optax.value_and_weighted_grad`).

  .. math::

     d &= \\sum_i c_i g_i, \\qquad c_i = \\frac{z_i / D_i}{\\sum_j z_j / D_j}, \\\\
     z &= \\operatorname{softmax}(\\xi), \\qquad D_i = L_i - L_i^{\\min} + \\epsilon

  Timing (no second forward pass): the official supervised trainers
  re-evaluate the batch after the optimizer step to get ``delta``. Here the
  update at step t receives ``L_t`` and keeps ``L_{t-1}`` in its state; the
  logit step for the previous move, ``delta = log D(L_{t-1}) - log D(L_t)``,
  is taken first and ``c_t`` comes from the new logits (``loss_weights``
  takes the same pending step, so the gradient of step t already uses it).
  There is therefore no delay in the logits: it is the order of the official
  toy trainer, which calls ``update(L_t)`` just before the step-t backward,
  and on a full-batch problem it is the official algorithm step for step. On
  mini-batches ``L_{t-1}`` and ``L_t`` come from different batches, so
  ``delta`` carries batch-to-batch noise that the same-batch second forward
  avoids. The first update takes no logit step.

  Guards: ``D_i = max(L_i - Lmin_i, 0) + eps`` (the official code takes the
  log of ``L_i - Lmin_i + eps`` unguarded). The official ``max_norm`` gradient
  clipping is not part of the method: chain ``optax.clip_by_global_norm``.

  Output scale: the mean-gradient scale, as in the paper: a convex
  combination of the task gradients (``c`` on the simplex; ``g0`` when all
  losses and logits are equal). No factor K.

  Args:
    num_tasks: number of tasks K.
    learning_rate: Adam learning rate of the logits (paper/LibMTL: 0.025;
      formerly ``w_lr``, a deprecated alias). Injectable.
    weight_decay: weight decay of the logits (LibMTL: 1e-3; famo.py 0.01;
      the official toy uses 0; formerly ``gamma``, a deprecated alias).
      Injectable.
    min_losses: ``(K,)`` lower bounds ``Lmin`` of the losses (default 0; the
      official toy uses ``(-2.1, -21)``).
    eps: added to ``L - Lmin`` before log and division (official: 1e-8).

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with :class:`FAMOState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.famo(2)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> for losses in ([1., 1.], [0.5, 0.9], [0.3, 0.85]):
    ...   c = tx.loss_weights(state, jnp.array(losses))
    ...   _, state = tx.update(params, state, params,
    ...                        task_losses=jnp.array(losses))
    >>> print(np.asarray(c, np.float64).round(4),
    ...       np.asarray(state.logits, np.float64).round(4))
    [0.7195 0.2805] [-0.0496  0.0496]
  """
  method = "famo"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(learning_rate, "learning_rate", method)
  validation.check_nonnegative(weight_decay, "weight_decay", method)
  validation.check_nonnegative(eps, "eps", method)
  if min_losses is not None and np.shape(min_losses) != (num_tasks,):
    raise ValueError(f"{method}: min_losses has shape {np.shape(min_losses)}, "
                     f"expected ({num_tasks},).")
  logits_opt = optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.adam(learning_rate))

  return _famo_transformation(num_tasks, method, logits_opt, min_losses, eps)


# --------------------------------------------------------------------------
# Smooth Tchebycheff scalarisation.
# --------------------------------------------------------------------------


class STCHState(NamedTuple):
  """State of :func:`stch`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update.
    count: ``()`` int32, updates so far (saturating at the end of warm-up);
      ``step`` is its deprecated name.
    nadir: ``(K,)`` running mean of the (clamped) losses of the
      nadir-estimation steps: the nadir vector once they are over.
  """
  weights: jax.Array
  count: jax.Array
  nadir: jax.Array
  step = renamed_field("count")


def stch(num_tasks: int, mu: float = 1.0, warmup_steps: int = 0,
         nadir_steps: int = 1, eps: float = 1e-20
         ) -> base.LossWeightingTransformation:
  """STCH: smooth Tchebycheff scalarisation of the log losses.

  Lin et al., "Smooth Tchebycheff Scalarization for Multi-Objective
  Optimization", ICML 2024, in the multi-task form of its official code (also
  LibMTL's): the model descends
  ``K mu log sum_i exp(l_i / mu)`` with ``l_i = log(L_i / N_i + eps)``, ``N``
  the nadir vector (mean losses of a warm-up phase), i.e.
  ``c_i = softmax(l / mu)_i / (L_i + eps N_i)`` (the paper's gradient over
  K, see the output scale); a smooth maximum that
  favours the task furthest (relatively) from its nadir.

  .. math::

     d &= \\sum_i c_i g_i, \\qquad
     c_i = \\frac{\\operatorname{softmax}(l / \\mu)_i}{L_i + \\epsilon N_i}, \\\\
     l_i &= \\log(L_i / N_i + \\epsilon)

  Phases, by update count: the first ``warmup_steps + nadir_steps`` updates
  descend the log-loss mean ``mean_i log(L_i + eps)``
  (``c_i = 1 / (K (L_i + eps))``),
  and the last ``nadir_steps`` of them are averaged into ``N``; STCH then
  starts. LibMTL: 4 warm-up epochs plus one nadir epoch (pass steps). With
  ``nadir_steps=0`` the nadir is 1 (plain STCH on ``log L``). Losses are
  clamped at 0; a nadir entry ``<= 0`` is replaced by 1.

  Output scale: the mean-gradient scale: ``c_i = p_i / L_i``
  (``p = softmax``), the paper's K-scaled scalarisation divided by K, so
  equal relative losses give the log-loss mean's gradient (``g0`` at unit
  losses); the warm-up phase likewise descends the mean of the log losses.
  The paper's and LibMTL's scale is ``optax.scale(num_tasks)`` away.

  Args:
    num_tasks: number of tasks K.
    mu: smoothing parameter (> 0; LibMTL default 1). Injectable.
    warmup_steps: updates before nadir estimation (static int).
    nadir_steps: updates averaged into the nadir vector (static int).
    eps: added inside the log (official: 1e-20). Injectable.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with :class:`STCHState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.stch(2, mu=1.0, nadir_steps=1)
    >>> params = jnp.zeros(2)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params,
    ...                      task_losses=jnp.array([2., 1.]))
    >>> c = tx.loss_weights(state, jnp.array([1., 1.]))
    >>> print(state.nadir, np.asarray(c, np.float64).round(4))
    [2. 1.] [0.3333 0.6667]
  """
  method = "stch"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive(mu, "mu", method)
  validation.check_nonnegative(eps, "eps", method)
  warmup_steps = validation.static_int(warmup_steps, "warmup_steps", method, 0)
  nadir_steps = validation.static_int(nadir_steps, "nadir_steps", method, 0)
  phase_end = warmup_steps + nadir_steps

  def init_state(dtype):
    return STCHState(base.uniform_weights(num_tasks, dtype),
                     jnp.zeros((), jnp.int32),
                     jnp.zeros((num_tasks,), dtype))

  def coefficients(state, losses):
    losses = jnp.maximum(losses, 0.0)
    e = jnp.asarray(eps, losses.dtype)
    if nadir_steps:
      nadir = jnp.where(state.nadir > 0, state.nadir, 1.0)
    else:
      nadir = jnp.ones_like(losses)
    tiny = jnp.finfo(losses.dtype).tiny
    big = jnp.finfo(losses.dtype).max
    log_rel = jnp.log(jnp.maximum(jnp.minimum(losses / nadir, big) + e, tiny))
    log_p = jax.nn.log_softmax(log_rel / jnp.asarray(mu, losses.dtype))
    # p_i / (L_i + eps N_i), in log space: no under/overflowing products.
    stch_c = _exp_finite(log_p - log_rel - jnp.log(nadir))
    warm_c = 1.0 / (num_tasks * jnp.maximum(losses + e, tiny))
    return jnp.where(state.count >= phase_end, stch_c, warm_c)

  def advance(state, losses, coeffs, step):
    del step
    in_nadir = (state.count >= warmup_steps) & (state.count < phase_end)
    nadir = _running_mean(state.nadir, jnp.maximum(losses, 0.0),
                          state.count - warmup_steps)
    return STCHState(coeffs, jnp.minimum(state.count + 1, phase_end),
                     jnp.where(in_nadir, nadir, state.nadir))

  return base.loss_weighting_transformation(num_tasks, method, init_state,
                                            coefficients, advance)


# --------------------------------------------------------------------------
# Memoryless and random weightings.
# --------------------------------------------------------------------------


def gls(num_tasks: int, eps: float = 1e-8) -> base.LossWeightingTransformation:
  """GLS: Geometric Loss Strategy, the geometric mean of the task losses.

  Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature
  Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR
  Workshops 2019. The model descends ``(prod_i L_i)^(1/K)``:
  ``c_i = G / (K L_i)`` with ``G`` the geometric mean of the losses, computed
  as ``exp(mean(log L) - log L_i) / K`` (no overflow of the product for large
  K). It is :func:`scale_invariant`'s coefficients times ``G``.

  .. math::

     d = \\sum_i c_i g_i, \\qquad c_i = \\frac{G}{K L_i}, \\qquad
     G = \\Big( \\prod_i L_i \\Big)^{1/K}

  Guard: ``L_i -> max(L_i, 0) + eps`` (the paper has no guard).

  Output scale: the mean-gradient scale, which is the paper's own (no
  factor K): ``g0`` when all losses are equal (``c_i = 1/K``).

  Args:
    num_tasks: number of tasks K.
    eps: added to the clamped losses. Injectable.

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`LossWeightsState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx, losses = mo.gls(2), jnp.array([1., 4.])  # G = 2
    >>> print(np.asarray(tx.loss_weights(tx.init(jnp.zeros(1)), losses),
    ...                  np.float64).round(4))
    [1.   0.25]
  """
  method = "gls"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(eps, "eps", method)

  def rule(losses):
    logs = jnp.log(_positive(losses, eps))
    return _exp_finite(jnp.mean(logs) - logs - jnp.log(float(num_tasks)))

  return _memoryless(num_tasks, method, rule)


def scale_invariant(num_tasks: int, eps: float = 1e-8
                    ) -> base.LossWeightingTransformation:
  """Scale-invariant linear scalarisation: the sum of the log losses.

  The baseline of Navon et al., "Multi-Task Learning as a Bargaining Game",
  ICML 2022 (Nash-MTL's ``scaleinvls``): the model descends
  ``sum_i log L_i``, whose loss weights ``1 / L_i`` are invariant to
  rescaling any task's loss; here ``c_i = 1 / (K L_i)`` (the mean of the log
  losses).

  .. math::

     d = \\sum_i c_i g_i, \\qquad c_i = \\frac{1}{K L_i}

  Guard: ``L_i -> max(L_i, 0) + eps`` (the reference code has no guard).

  Output scale: the mean-gradient scale: ``c_i = 1 / (K L_i)``, so unit
  losses give ``g0`` (as :func:`gls` at equal losses). The reference code's
  ``1 / L_i`` is ``optax.scale(num_tasks)`` away.

  Args:
    num_tasks: number of tasks K.
    eps: the guard's offset of the clamped losses (injectable).

  Returns:
    A loss weighting (:class:`~mtl_optax.LossWeightingTransformation`)
    whose state is a :class:`LossWeightsState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.scale_invariant(2)
    >>> grads = jnp.array([[1., 0.], [0., 1.]])  # stacked per-task gradients
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(2)), jnp.zeros(2),
    ...                           task_losses=jnp.array([2., 0.5]))
    >>> print(np.asarray(update, np.float64).round(4))
    [0.25 1.  ]
  """
  method = "scale_invariant"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(eps, "eps", method)
  return _memoryless(num_tasks, method,
                     lambda losses: 1.0 / (num_tasks * _positive(losses, eps)))


class RandomWeightingState(NamedTuple):
  """State of :func:`random_weighting` (``RLWState`` is the same class).

  Attributes:
    weights: ``(K,)`` the random weights of the last update (on the simplex).
    key: PRNG key; the next weights are drawn from ``split(key)[1]``.
  """
  weights: jax.Array
  key: jax.Array


RLWState = RandomWeightingState


def random_weighting(num_tasks: int, seed: int = 0
                     ) -> base.LossWeightingTransformation:
  """Random Loss Weighting (RLW): random weights, a fresh draw every step.

  Lin, Ye, Xu, Shi & Zhang, "Reasonable Effectiveness of Random Weighting: A
  Litmus Test for Multi-Task Learning", TMLR 2022 (arXiv:2111.10603),
  Algorithm 2 (as LibMTL's ``RLW`` and TorchJD's ``Random``): each step
  ``c = softmax(z)``, ``z ~ N(0, I_K)`` in float32, from
  ``key, sub = split(key)``; ``z = normal(sub, (K,))``. One method on both
  paths: as a loss weighting (the gradient of ``sum_i c_i L_i``,
  :func:`mtl_optax.value_and_weighted_grad`; ``loss_weights`` and ``update``
  draw from the same key, so the weights of the weighted-loss gradient are
  the ones the state records) and on stacked per-task gradients
  (``sum_i c_i g_i``). ``task_losses`` is optional: the weights do not
  depend on the losses. The key advances once per update.

  Output scale: the mean-gradient scale, as in the paper: ``c`` lies on the
  simplex with mean ``1/K``, so the update is ``g0`` in expectation. No
  factor K.

  Args:
    num_tasks: number of tasks K.
    seed: seed of the PRNG key kept in the state (static int).

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`RandomWeightingState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.random_weighting(2, seed=0)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    >>> print(np.asarray(state.weights, np.float64).round(4))
    [0.3997 0.6003]
    >>> print(np.asarray(update, np.float64).round(4))
    [2.0031 1.     1.    ]
  """
  method = "random_weighting"
  validation.check_seed(seed, method)
  num_tasks = validation.check_num_tasks(num_tasks, method)

  def init_state(dtype):
    return RandomWeightingState(base.uniform_weights(num_tasks, dtype),
                                jax.random.PRNGKey(seed))

  def coefficients(state, losses):
    _, subkey = prng.split(state.key)
    draw = prng.normal(subkey, (num_tasks,), jnp.float32)
    return jax.nn.softmax(draw).astype(losses.dtype)

  def advance(state, losses, coeffs, step):
    del losses, step
    key, _ = prng.split(state.key)
    return RandomWeightingState(coeffs, key)

  return base.loss_weighting_transformation(num_tasks, method, init_state,
                                            coefficients, advance,
                                            requires_task_losses=False)


def random_loss_weighting(num_tasks: int, seed: int = 0
                          ) -> base.LossWeightingTransformation:
  """Deprecated alias of :func:`random_weighting` (the same method)."""
  warnings.warn("mo.random_loss_weighting is deprecated: use "
                "mo.random_weighting (the same method, on both paths).",
                DeprecationWarning, stacklevel=2)
  return random_weighting(num_tasks, seed)


# --------------------------------------------------------------------------
# DB-MTL (needs stacked per-task gradients).
# --------------------------------------------------------------------------


class DBMTLState(NamedTuple):
  """State of :func:`db_mtl`.

  Attributes:
    weights: ``(K,)`` the coefficients of the last update on the EMA buffer
      (``update = sum_i weights[i] ghat_i``): the magnitude factors
      ``alpha_i`` over K.
    count: ``()`` int32, updates so far; ``step`` is its deprecated name.
    grad_buffer: tree shaped like the stacked gradients (leaves ``(K, ...)``,
      float32 or wider): the EMA ``ghat_i`` of the log-loss gradients.
  """
  weights: jax.Array
  count: jax.Array
  grad_buffer: Any
  step = renamed_field("count")


@deprecation.renamed_arguments(beta="decay")
def db_mtl(num_tasks: int, decay: float = 0.9, beta_sigma: float = 0.0,
           eps: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """DB-MTL: dual balancing of loss scales and gradient magnitudes.

  Lin et al., "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029
  (2023). Loss-scale balancing: each task's gradient is that of
  ``log(L_i + eps)``, ``h_i = g_i / (L_i + eps)``. Gradient-magnitude
  balancing: an EMA ``ghat_i <- decay_t ghat_i + (1 - decay_t) h_i`` with
  ``decay_t = decay / t^beta_sigma`` (``ghat = 0`` at the start; optax's
  meaning of ``decay``, the paper's ``beta``), then
  ``d = (1/K) sum_i (max_j ||ghat_j|| / ||ghat_i||) ghat_i``: every task
  enters with the largest task's gradient norm.

  .. math::

     d &= \\frac{1}{K} \\sum_i \\frac{\\max_j \\|\\hat g_j\\|}{\\|\\hat g_i\\|}\\, \\hat g_i,
     \\\\
     \\hat g_i &\\leftarrow \\beta_t \\hat g_i + (1 - \\beta_t) h_i, \\qquad
     h_i = \\frac{g_i}{L_i + \\epsilon}

  Unlike the other methods of this module it needs per-task gradient
  VECTORS (the EMA is kept per task, O(K x params) state), so it is a
  stacked-gradient method (:func:`mtl_optax.value_and_task_grads`), not a
  :class:`~mtl_optax.LossWeightingTransformation`: it has no single-backward
  form, and ``mo.value_and_weighted_grad`` refuses it. ``task_losses`` is
  required.

  Guards: ``L_i -> max(L_i, 0) + eps``; a task whose EMA is exactly zero gets
  factor 0 (LibMTL divides by ``||ghat_i|| + 1e-8``, which makes the factors
  depend on the gradients' absolute scale; here they are scale-free).

  Output scale: the mean-gradient scale: the mean of K vectors of norm
  ``max_j ||ghat_j||`` (equal EMAs give their mean). The paper's sum is
  ``optax.scale(num_tasks)`` away.

  Args:
    num_tasks: number of tasks K.
    decay: EMA decay, the weight of the old buffer (LibMTL's ``beta``: 0.9;
      ``beta`` is a deprecated alias with the same value). Injectable.
    beta_sigma: decay exponent of ``decay`` over steps (LibMTL: 0).
      Injectable.
    eps: added to the clamped losses (LibMTL: 1e-8). Injectable.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DBMTLState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.db_mtl(2)
    >>> grads = jnp.array([[3., 0.], [0., 1.]])
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(2)), None,
    ...                           task_losses=jnp.array([1., 1.]))
    >>> print(np.asarray(update, np.float64).round(4),
    ...       np.asarray(state.weights, np.float64).round(4))
    [0.15 0.15] [0.5 1.5]
  """
  method = "db_mtl"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  for name, value in (("decay", decay), ("beta_sigma", beta_sigma),
                      ("eps", eps)):
    validation.check_nonnegative(value, name, method)

  def init_fn(params):
    def zeros(p):
      p = jnp.asarray(p)
      dtype = jnp.promote_types(p.dtype, jnp.float32)
      return jnp.zeros((num_tasks, *p.shape), dtype)
    return DBMTLState(base.uniform_weights(num_tasks, base.state_dtype(params)),
                      jnp.zeros((), jnp.int32), jax.tree.map(zeros, params))

  def step(updates, state, params, extra_args):
    del params
    dtype = state.weights.dtype
    losses = jnp.asarray(extra_args["task_losses"]).astype(dtype)
    inv = 1.0 / _positive(losses, eps)
    count = state.count + 1
    decay_t = jnp.asarray(decay, dtype) / count.astype(dtype) ** jnp.asarray(
        beta_sigma, dtype)

    def ema(g, buf):
      scale = inv.astype(buf.dtype).reshape((num_tasks,) + (1,) * (g.ndim - 1))
      h = g.astype(buf.dtype) * scale
      return h + decay_t.astype(buf.dtype) * (buf - h)

    buffer = jax.tree.map(ema, updates, state.grad_buffer)
    norms = tree_math.task_norms(buffer).astype(dtype)
    big = jnp.finfo(dtype).max
    peak = jnp.max(norms)
    alpha = jnp.where(norms > 0, jnp.clip(
        peak / jnp.where(norms > 0, norms, 1.0), 0.0, big), 0.0) / num_tasks
    out, capped = base.weighted_sum_in_range(alpha, buffer, updates)
    # A +-inf loss would be clamped (-inf) or give a zero term (+inf): make
    # the update NaN instead, for optax.apply_if_finite, and keep the state.
    losses_ok = jnp.all(jnp.isfinite(losses))
    out = base.nan_unless(losses_ok, out)
    finite = losses_ok & jnp.all(jnp.isfinite(alpha)) & base.all_finite(out)
    return out, DBMTLState(alpha * capped, count, buffer), finite

  return base.guarded_transformation(num_tasks, method, init_fn, step,
                                     requires_task_losses=True)
