"""Look-ahead inter-task affinity (Transference / TAG) and IT-MTL.

Fifty, Amid, Zhao, Yu, Anil & Finn, "Measuring and Harnessing Transference
in Multi-Task Learning", arXiv:2010.15413 (2020), and "Efficiently
Identifying Task Groupings for Multi-Task Learning" (TAG), NeurIPS 2021,
arXiv:2109.04617.

The inter-task affinity of a step on task ``i`` onto task ``j`` is the
relative change of ``L_j`` after one SGD step of the shared parameters on
``L_i`` alone, on the same batch, task-specific parameters fixed::

    theta_s' = theta_s - lr * grad_{theta_s} L_i
    Z[i, j]  = 1 - L_j(theta_s', theta_j) / L_j(theta_s, theta_j)

``Z[i, j] > 0``: the step on ``i`` helps ``j``. **Orientation**: the row is
the task that steps, the column the task that is affected. TAG's published
dictionaries (``tag_published_affinities.json``, the official notebooks) use
the transpose, ``D[a][b] = Z[b][a]`` (outer key: the receiving task).

* :func:`task_affinity`: the K x K matrix at one point, all K look-aheads in
  one ``jax.vmap``-ed forward pass (plain SGD, SGD with the optimiser's
  momentum as in the official CelebA code, weight decay as in the official
  Taskonomy code, optional division by the learning rate as in both codes).
* :func:`track_affinity`: a transformation that accumulates the running mean
  of ``Z`` every ``update_every`` steps (``lax.cond``: nothing is evaluated on the
  other steps) and passes the stacked gradients through to an aggregator, or
  runs one itself (``inner``).
* :func:`select_task_groups`: TAG's network selection from averaged
  affinities (host-side, exact).
* :func:`it_mtl`: IT-MTL, the per-step use of transference: apply whichever
  candidate aggregator's update gives the best look-ahead.

Inside ``optax.partition`` the look-ahead moves only the leaves the method is
given (the shared ones); ``loss_fn`` is then called with ``optax.MaskedNode``
in place of the others, so wrap it with
``mo.masked_loss_fn(loss_fn, params)``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import aggregators
from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import validation
# The node that hides a wrapped method's state from optax.tree.get.

__all__ = (
    "ITMTLState",
    "TaskGrouping",
    "TrackAffinityState",
    "it_mtl",
    "select_task_groups",
    "task_affinity",
    "track_affinity",
)

SINGLETON_SCORE = -1e6  # TAG notebook: a task alone is essentially never chosen


# --------------------------------------------------------------------------
# Look-ahead machinery (pure JAX, shared by the three per-step entry points).


def _shared_flags(shared_mask: Any, params: Any, shared_label: str,
                  method: str) -> list[bool]:
  """One static bool per leaf of ``params``: does the look-ahead move it."""
  num_leaves = len(jax.tree.leaves(params))
  if shared_mask is None:
    return [True] * num_leaves
  if callable(shared_mask):
    raise TypeError(
        f"{method}: shared_mask must be a pytree (a prefix of params) of bools "
        "or labels, not a callable: compute it from params beforehand.")
  try:
    full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub),
                        shared_mask, params)
  except (ValueError, TypeError) as err:
    raise ValueError(
        f"{method}: shared_mask must be a prefix of the parameter tree "
        f"(structure {jax.tree.structure(params)}), got "
        f"{jax.tree.structure(shared_mask)}.") from err
  flags = []
  for path, m in jax.tree_util.tree_leaves_with_path(full):
    if isinstance(m, str):
      flags.append(m == shared_label)
    elif validation.is_concrete(m) and np.ndim(m) == 0:
      flags.append(bool(np.asarray(m)))
    else:
      raise TypeError(
          f"{method}: shared_mask leaf {jax.tree_util.keystr(path)} must be a "
          f"Python bool or a label string, got {m!r}.")
  if len(flags) != num_leaves:
    raise ValueError(f"{method}: shared_mask does not cover every leaf of "
                     "params.")
  return flags


def _lookahead_losses(loss_fn: Callable[[Any], jax.Array], params: Any,
                      flags: Sequence[bool], displacements: Sequence[jax.Array],
                      num_points: int, with_base: bool) -> jax.Array:
  """``loss_fn`` at ``params + d_m`` for every row ``m``: ONE vmapped call.

  ``displacements`` holds, for each flagged leaf in order, an array
  ``(num_points, *leaf.shape)``; other leaves stay as they are. With
  ``with_base`` a zero displacement is prepended (row 0 = ``loss_fn(params)``,
  evaluated by the same batched computation as the look-aheads).

  Returns:
    ``(num_points [+ 1], K)`` losses.
  """
  leaves, treedef = jax.tree.flatten(params)
  moved = [k for k, flag in enumerate(flags) if flag]
  if with_base:
    displacements = [jnp.concatenate([jnp.zeros_like(d[:1]), d])
                     for d in displacements]
    num_points += 1

  def at(disp):
    new = list(leaves)
    for k, d in zip(moved, disp):
      new[k] = (leaves[k] + d).astype(jnp.asarray(leaves[k]).dtype)
    return loss_fn(jax.tree.unflatten(treedef, new))

  out = jax.vmap(at, axis_size=num_points)(list(displacements))
  if jnp.ndim(out) != 2:
    raise ValueError("loss_fn must return a 1-D vector of task losses, got "
                     f"shape {jnp.shape(out)[1:]}.")
  return out


def _transference(before: jax.Array, after: jax.Array) -> jax.Array:
  """``1 - after / before`` as ``(before - after) / |before|``, guarded.

  Equal to the papers' ratio for positive losses; with ``|before|`` the sign
  still means "lower is better" for losses that can be negative. Where
  ``before == 0`` the relative change is undefined: the result is 0 (times
  ``after``, so a non-finite look-ahead still gives NaN). NaN propagates.
  """
  acc = jnp.result_type(jnp.float32, before.dtype, after.dtype)
  before = before.astype(acc)
  after = after.astype(acc)
  denom = jnp.abs(before)
  zero = denom == 0
  ratio = (before - after) / jnp.where(zero, 1.0, denom)
  return jnp.where(zero, after * 0.0, ratio)


def _check_stacked_on(task_grads: Any, params: Any, method: str,
                      what: str = "task_grads") -> int:
  """K from ``task_grads``, which must be ``params`` with a leading task axis."""
  g_leaves = jax.tree.leaves(task_grads)
  p_leaves = jax.tree.leaves(params)
  if not g_leaves:
    raise ValueError(f"{method}: {what} has no leaves.")
  num_tasks = np.shape(g_leaves[0])[0] if np.ndim(g_leaves[0]) else 0
  validation.check_task_axis(task_grads, num_tasks, method, what)
  if jax.tree.structure(task_grads) != jax.tree.structure(params) or not all(
      np.shape(g)[1:] == np.shape(p) for g, p in zip(g_leaves, p_leaves)):
    raise ValueError(
        f"{method}: {what} must have the structure of params with a "
        f"leading task axis on every leaf; got {jax.tree.structure(task_grads)}"
        f" with shapes {[np.shape(g) for g in g_leaves]} for params "
        f"{jax.tree.structure(params)} with shapes "
        f"{[np.shape(p) for p in p_leaves]}.")
  return num_tasks


def _affinity(loss_fn, params, task_grads, lr, flags, momentum,
              momentum_decay, weight_decay, normalize_by_lr, losses,
              num_tasks, method):
  """The K x K affinity; see :func:`task_affinity` (no input checks here)."""
  p_leaves = jax.tree.leaves(params)
  g_leaves = jax.tree.leaves(task_grads)
  v_leaves = (None if momentum is None else jax.tree.leaves(momentum))
  if v_leaves is not None and len(v_leaves) != len(p_leaves):
    raise ValueError(f"{method}: momentum must have the structure of params.")
  displacements = []
  for k, flag in enumerate(flags):
    if not flag:
      continue
    g = jnp.asarray(g_leaves[k])
    p = jnp.asarray(p_leaves[k])
    acc = jnp.result_type(jnp.float32, g.dtype, p.dtype)
    lr_acc = jnp.asarray(lr, acc)
    step = g.astype(acc)
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
      step = step + jnp.asarray(weight_decay, acc) * p.astype(acc)[None]
    step = -lr_acc * step
    if v_leaves is not None:
      step = step + (jnp.asarray(momentum_decay, acc)
                     * jnp.asarray(v_leaves[k]).astype(acc))[None]
    displacements.append(step)
  with_base = losses is None
  out = _lookahead_losses(loss_fn, params, flags, displacements, num_tasks,
                          with_base)
  if out.shape[1] != num_tasks:
    raise ValueError(f"{method}: loss_fn returns {out.shape[1]} task losses "
                     f"but the gradients have {num_tasks} tasks.")
  if with_base:
    before, after = out[0], out[1:]
  else:
    validation.check_task_losses(losses, num_tasks, method)
    before, after = jnp.asarray(losses), out
  z = _transference(before, after)
  if normalize_by_lr:
    z = z / jnp.asarray(lr, z.dtype)
  return z


def task_affinity(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    task_grads: Any,
    lr: float | jax.Array,
    *,
    shared_mask: Any = None,
    shared_label: str = "shared",
    momentum: Any = None,
    momentum_decay: float | jax.Array = 0.9,
    weight_decay: float | jax.Array = 0.0,
    normalize_by_lr: bool = False,
    losses: Optional[jax.Array] = None,
) -> jax.Array:
  """Look-ahead inter-task affinity (transference) at one point.

  Fifty et al., "Measuring and Harnessing Transference in Multi-Task
  Learning", arXiv:2010.15413; "Efficiently Identifying Task Groupings for
  Multi-Task Learning" (TAG), NeurIPS 2021, arXiv:2109.04617, Eq. 1:
  ``Z[i, j] = 1 - L_j(theta_s - lr g_i, theta_j) / L_j(theta_s, theta_j)``.

  .. math::

     Z_{ij} = 1 - \\frac{L_j(\\theta_s - \\eta\\, g_i, \\theta_j)}
     {L_j(\\theta_s, \\theta_j)}

  Row ``i`` is the task whose gradient takes the step, column ``j`` the task
  whose loss is measured (TAG's dictionaries: ``D[a][b] = Z[b][a]``). Only the
  shared leaves move; all K look-ahead points (and, without ``losses``, the
  current point) are evaluated by ONE ``jax.vmap``-ed call of ``loss_fn``.
  For small ``lr``, ``Z[i, j] ~= lr <g_i, g_j> / L_j``. Task-specific heads
  only change the diagonal: the gradient of ``L_i`` is zero on head ``j != i``.

  Look-ahead step on the shared leaves ``theta``:
  ``theta' = theta + momentum_decay * v - lr (g_i + weight_decay * theta)``:

  * plain SGD (TAG Eq. 1): the defaults;
  * official CelebA code (Keras SGD with momentum): ``momentum=v``, the
    optimiser's velocity, i.e. its last parameter displacement (for
    ``optax.sgd(lr, momentum=mu)`` with trace ``t``: ``v = -lr * t``);
  * official Taskonomy code: ``weight_decay=1e-4`` (its momentum branch never
    fires);
  * both codes report ``Z / lr``: ``normalize_by_lr=True``.

  Degenerate input: where ``L_j(theta) == 0`` the ratio is undefined and
  ``Z[:, j]`` is 0 (NaN if the look-ahead loss is not finite). Losses are
  divided by ``|L_j|``, which equals the papers' ratio for positive losses and
  keeps ``Z > 0`` meaning "lower loss" for losses that can be negative.
  Non-finite gradients or losses give NaN/inf entries.

  Args:
    loss_fn: ``params -> (K,)`` task losses on the current batch.
    params: the current parameters.
    task_grads: per-task gradients, the structure of ``params`` with a
      leading task axis (from :func:`mtl_optax.value_and_task_grads`).
    lr: look-ahead learning rate (traced values are fine).
    shared_mask: which leaves are shared: None (all), or a pytree prefix of
      ``params`` whose leaves are Python bools or ``optax.partition``-style
      label strings (a leaf is shared iff its label equals ``shared_label``).
    shared_label: the label of the shared leaves in a label tree.
    momentum: optional velocity tree (structure of ``params``), see above.
    momentum_decay: ``mu`` of the velocity term.
    weight_decay: L2 coefficient added to the look-ahead gradient.
    normalize_by_lr: divide by ``lr`` (the official codes' scale).
    losses: optional ``(K,)`` current losses ``L(theta)``; by default they
      are evaluated in the same vmapped pass (one extra row), which keeps the
      small differences ``L - L'`` consistent to rounding.

  Returns:
    ``(K, K)`` affinity matrix, float32 or wider.

  Example (tasks 0 and 1 pull the same way, task 2 the other way):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> targets = jnp.array([[1., 0.], [2., 0.], [-1., 0.]])
    >>> loss_fn = lambda w: jnp.sum((w - targets) ** 2, axis=1)
    >>> w = jnp.zeros(2)
    >>> losses, grads = mo.value_and_task_grads(loss_fn)(w)
    >>> z = mo.task_affinity(loss_fn, w, grads, lr=0.1)
    >>> print(np.asarray(z, np.float64).round(4))
    [[ 0.36  0.19 -0.44]
     [ 0.64  0.36 -0.96]
     [-0.44 -0.21  0.36]]
  """
  method = "task_affinity"
  num_tasks = _check_stacked_on(task_grads, params, method)
  flags = _shared_flags(shared_mask, params, shared_label, method)
  return _affinity(loss_fn, params, task_grads, lr, flags, momentum,
                   momentum_decay, weight_decay, normalize_by_lr, losses,
                   num_tasks, method)


# --------------------------------------------------------------------------
# track_affinity: running mean of Z inside an optax chain.


class TrackAffinityState(NamedTuple):
  """State of :func:`track_affinity`.

  Attributes:
    weights: ``(K,)``: without ``inner``, uniform ``1/K`` (the stacked
      gradients pass through unweighted; the aggregator downstream keeps its
      own ``weights``); with ``inner``, the wrapped method's weights.
    affinity: ``(K, K)`` running mean of ``Z`` over the look-ahead steps
      (``Z[i, j]``: effect of a step on ``i`` on task ``j``).
    last_affinity: ``(K, K)`` the last finite ``Z`` computed.
    num_averaged: number of look-aheads averaged into ``affinity`` (this
      field was called ``count`` before; ``count`` is now the step counter).
    count: number of finite updates seen (look-ahead when
      ``count % update_every == 0``; formerly ``step``, a deprecated
      read-only alias).
    inner_state: the wrapped method's state, held opaquely (hidden from
      ``optax.tree.get``); it is ``inner_state.value``.
  """
  weights: jax.Array
  affinity: jax.Array
  last_affinity: jax.Array
  num_averaged: jax.Array
  count: jax.Array
  inner_state: Any

  step = deprecation.renamed_field("count", "step")


def _check_inner(inner: Any, method: str, what: str = "inner") -> None:
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(f"{method}: {what} must be an optax transformation built "
                    f"for the same num_tasks (e.g. mo.cagrad(num_tasks)), got "
                    f"{type(inner).__name__}.")


def _weights_of(state: Any, num_tasks: int, method: str) -> jax.Array:
  weights = optax.tree.get(state, "weights")
  if weights is None or np.shape(weights) != (num_tasks,):
    found = "none" if weights is None else f"shape {np.shape(weights)}"
    raise ValueError(f"{method}: a wrapped method's state must have a "
                     f"`weights` field of shape ({num_tasks},), found {found}; "
                     f"build it with num_tasks={num_tasks}.")
  return weights


def _checked_loss_fn(params: Any, extra_args: dict, method: str) -> Callable:
  """The ``loss_fn`` extra argument, checked and guarded (its losses at the
  look-ahead points); the look-ahead needs ``params`` too."""
  loss_fn = extra_args.get("loss_fn")
  validation.check_loss_fn(loss_fn, method)
  if params is None:
    raise ValueError(f"{method}: update needs params (the look-ahead points "
                     "are displacements of params): call "
                     "tx.update(grads, state, params, loss_fn=...).")
  return base.guard_loss_fn(loss_fn, params, method)


def _tracked_affinity(state: TrackAffinityState, update_every: Any,
                      measure_z: Callable[[], jax.Array]):
  """``(affinity, last_affinity, num_averaged)`` after this step: ``Z`` is
  measured and averaged in on due steps only (a ``lax.cond``), and only if
  finite."""

  def measure(_):
    z = measure_z()
    finite = jnp.all(jnp.isfinite(z))
    num_averaged = state.num_averaged + finite.astype(jnp.int32)
    mean = state.affinity + (z - state.affinity) / jnp.maximum(
        num_averaged, 1).astype(z.dtype)
    return (jnp.where(finite, mean, state.affinity),
            jnp.where(finite, z, state.last_affinity), num_averaged)

  def skip(_):
    return state.affinity, state.last_affinity, state.num_averaged

  if validation.is_concrete(update_every) and int(update_every) == 1:
    return measure(None)
  due = state.count % jnp.asarray(update_every, state.count.dtype) == 0
  return jax.lax.cond(due, measure, skip, None)


def _track_affinity_init(inner: Any, params: Any, num_tasks: int,
                         method: str) -> TrackAffinityState:
  """The initial state: zero affinities and counters, and the wrapped
  method's state and weights (uniform without ``inner``)."""
  dtype = base.state_dtype(params)
  zeros = jnp.zeros((num_tasks, num_tasks), dtype)
  if inner is None:
    inner_state, weights = (), base.uniform_weights(num_tasks, dtype)
  else:
    inner_state = inner.init(params)
    weights = _weights_of(inner_state, num_tasks, method).astype(dtype)
  return TrackAffinityState(weights, zeros, zeros, jnp.zeros((), jnp.int32),
                            jnp.zeros((), jnp.int32), base.Opaque(inner_state))


def _inner_step(inner: Any, updates: Any, state: TrackAffinityState,
                params: Any, extra_args: dict, num_tasks: int, method: str):
  """``(output, inner_state, weights)`` of the wrapped method's step; without
  ``inner``, the stacked gradients pass through and the weights stay."""
  if inner is None:
    return updates, (), state.weights
  out, inner_state = inner.update(updates, state.inner_state.value, params,
                                  **extra_args)
  weights = _weights_of(inner_state, num_tasks, method)
  return out, inner_state, weights.astype(state.affinity.dtype)


@deprecation.renamed_arguments(every="update_every")
def track_affinity(
    num_tasks: int,
    lr: float | jax.Array,
    update_every: int = 10,
    *,
    inner: Optional[optax.GradientTransformation] = None,
    shared_mask: Any = None,
    shared_label: str = "shared",
    weight_decay: float | jax.Array = 0.0,
    normalize_by_lr: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Tracks TAG's average inter-task affinity during training.

  Fifty et al., TAG, NeurIPS 2021 (arXiv:2109.04617), after Transference
  (arXiv:2010.15413): ``Z_hat = (1/T) sum_t Z^t``, with ``Z^t`` from
  :func:`task_affinity` (plain SGD look-ahead of step ``lr``) on the step's
  batch every ``update_every`` steps (TAG's efficient default: 10); on the
  other steps (``count % update_every != 0``) a ``lax.cond`` skips the
  look-ahead (under ``jax.vmap`` a ``cond`` runs both branches). The
  look-ahead needs ``params`` and the ``loss_fn`` extra argument (``params ->
  (K,)`` losses on the current batch), evaluated at ``K + 1`` points (the
  current one and the K look-aheads) in one vmapped call.

  .. math::

     \\hat Z &= \\frac{1}{T} \\sum_t Z^t, \\\\
     Z^t_{ij} &= 1 - \\frac{L_j(\\theta_s - \\eta\\, g_i, \\theta_j)}
     {L_j(\\theta_s, \\theta_j)}

  Two ways to use it:

  * pass-through (``inner=None``): the stacked per-task gradients come out
    unchanged, so it goes BEFORE an aggregator,
    ``optax.chain(mo.track_affinity(K, lr), mo.cagrad(K), optax.adam(lr))``.
    Then two states have a ``weights`` field; read the aggregator's with
    ``optax.tree.get(opt_state[1], 'weights')``.
  * wrapping (``inner=mo.cagrad(K)``): returns the inner method's update, and
    ``weights`` is the inner method's, so ``optax.tree.get(opt_state,
    'weights')`` works on the whole chain.

  The look-ahead moves the leaves selected by ``shared_mask`` (all by
  default; inside ``optax.partition`` only the partition's leaves are seen).
  Momentum look-aheads need the optimiser's velocity, which a transformation
  before the optimiser cannot see: use :func:`task_affinity` with
  ``momentum=`` for those. A step with non-finite gradients leaves the state
  unchanged (for ``optax.apply_if_finite``); a non-finite ``Z`` is not
  averaged in.

  Args:
    num_tasks: number of tasks K.
    lr: look-ahead learning rate, the optimiser's own (hence ``lr`` as in
      :func:`task_affinity`, not an inner step size). Injectable.
    update_every: period of the look-ahead in steps (first at step 0;
      formerly ``every``, a deprecated alias).
    inner: optional aggregator built for ``num_tasks`` to run after tracking.
    shared_mask: which leaves the look-ahead moves, as in
      :func:`task_affinity` (a pytree, not a callable).
    shared_label: the shared label when ``shared_mask`` holds labels.
    weight_decay: L2 term of the look-ahead gradient (Taskonomy: 1e-4).
    normalize_by_lr: accumulate ``Z / lr`` (the official codes' scale).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with
    :class:`TrackAffinityState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, optax, mtl_optax as mo
    >>> targets = jnp.array([[1., 0.], [2., 0.], [-1., 0.]])
    >>> loss_fn = lambda w: jnp.sum((w - targets) ** 2, axis=1)
    >>> tx = optax.chain(mo.track_affinity(3, lr=0.1, update_every=2),
    ...                  mo.linear_scalarization(3), optax.sgd(0.1))
    >>> w, state = jnp.zeros(2), tx.init(jnp.zeros(2))
    >>> for _ in range(3):
    ...   losses, grads = mo.value_and_task_grads(loss_fn)(w)
    ...   updates, state = tx.update(grads, state, w, loss_fn=loss_fn)
    ...   w = optax.apply_updates(w, updates)
    >>> print(int(state[0].num_averaged),
    ...       np.asarray(state[0].affinity, np.float64).round(4))
    2 [[ 0.36    0.1776 -0.3501]
     [ 0.6759  0.36   -0.8042]
     [-0.5996 -0.2558  0.36  ]]
  """
  method = "track_affinity"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(lr, "lr", method)
  validation.check_positive_int(update_every, "update_every", method)
  if inner is not None:
    _check_inner(inner, method)

  def step(updates, state, params, extra_args):
    loss_fn = _checked_loss_fn(params, extra_args, method)
    flags = _shared_flags(shared_mask, params, shared_label, method)
    out, inner_state, weights = _inner_step(inner, updates, state, params,
                                            extra_args, num_tasks, method)
    affinity, last, num_averaged = _tracked_affinity(
        state, update_every, lambda: _affinity(
            loss_fn, params, updates, lr, flags, None, 0.0, weight_decay,
            normalize_by_lr, None, num_tasks, method).astype(
                state.affinity.dtype))
    new_state = TrackAffinityState(weights, affinity, last, num_averaged,
                                   state.count + 1, base.Opaque(inner_state))
    return out, new_state, base.all_finite((updates, weights, out))

  return base.guarded_transformation(
      num_tasks, method,
      lambda params: _track_affinity_init(inner, params, num_tasks, method),
      step)


# --------------------------------------------------------------------------
# IT-MTL: choose among candidate aggregators by their look-ahead.


def _scores(terms: jax.Array, after: jax.Array, acc) -> tuple[jax.Array,
                                                               jax.Array]:
  """Per-candidate sums of ``terms`` (C, K) kept in the finite range.

  Terms and sums are clipped to ``+-finfo.max`` (1e30-scale or mixed
  1e30/1e-30 look-aheads overflow the ratio or the sum, never to NaN); a
  candidate whose look-ahead losses ``after`` are not all finite is not
  usable and scores 0.
  """
  big = jnp.finfo(acc).max
  terms = jnp.clip(terms.astype(acc), -big, big)
  usable = jnp.all(jnp.isfinite(after), axis=1) & jnp.all(
      jnp.isfinite(terms), axis=1)
  scores = jnp.clip(jnp.sum(jnp.where(usable[:, None], terms, 0.0), axis=1),
                    -big, big)
  return scores, usable


class ITMTLState(NamedTuple):
  """State of :func:`it_mtl`.

  Attributes:
    weights: ``(K,)`` the winning candidate's coefficients (its own
      ``weights``), so ``update = sum_i weights[i] g_i`` for weightings.
    choice: ``()`` int32 index of the candidate applied last.
    scores: ``(C,)`` the candidates' last scores: total look-ahead loss
      (``criterion='loss'``, lower wins) or total transference
      (``criterion='transference'``, higher wins).
    wins: ``(C,)`` int32, how many steps each candidate has won.
    candidate_states: the candidates' states (a tuple), held opaquely (hidden
      from ``optax.tree.get``); it is ``candidate_states.value``.
  """
  weights: jax.Array
  choice: jax.Array
  scores: jax.Array
  wins: jax.Array
  candidate_states: Any


CRITERIA = ("transference", "loss")


def _it_mtl_candidates(candidates: Any, num_tasks: int, seed: int,
                       method: str) -> tuple:
  """The candidates as a non-empty tuple of transformations; default the
  paper's pair, the mean gradient and PCGrad."""
  if candidates is None:
    candidates = (aggregators.linear_scalarization(num_tasks),
                  aggregators.pcgrad(num_tasks, seed=seed))
  candidates = tuple(candidates)
  if not candidates:
    raise ValueError(f"{method}: candidates must not be empty.")
  for c in candidates:
    _check_inner(c, method, "every candidate")
  return candidates


def _it_mtl_init(candidates: tuple, params: Any, num_tasks: int,
                 method: str) -> ITMTLState:
  """The initial state: uniform weights, no wins, the candidates' states
  (each checked to have ``(K,)`` weights)."""
  dtype = base.state_dtype(params)
  states = tuple(c.init(params) for c in candidates)
  for s in states:
    _weights_of(s, num_tasks, method)
  num_candidates = len(candidates)
  return ITMTLState(base.uniform_weights(num_tasks, dtype),
                    jnp.zeros((), jnp.int32),
                    jnp.zeros((num_candidates,), dtype),
                    jnp.zeros((num_candidates,), jnp.int32), base.Opaque(states))


def _proposals(candidates: tuple, updates: Any, states: tuple, params: Any,
               extra_args: dict, num_tasks: int, method: str):
  """``(stacked, weights, new_states)``: every candidate's update stacked on
  a leading axis C, their ``(C, K)`` weights and their new states."""
  proposals, new_states = [], []
  for c, s in zip(candidates, states):
    d, s = c.update(updates, s, params, **extra_args)
    proposals.append(d)
    new_states.append(s)
  weights = jnp.stack([_weights_of(s, num_tasks, method) for s in new_states])
  stacked = jax.tree.map(lambda *d: jnp.stack(d), *proposals)
  return stacked, weights, new_states


def _best_candidate(loss_fn: Callable, params: Any, stacked: Any,
                    lookahead_lr: Any, criterion: str, num_tasks: int,
                    method: str):
  """``(choice, scores, ok)`` for the candidates' proposals ``stacked``
  (leading axis C): the look-aheads ``params - lookahead_lr d_c`` scored in
  one vmapped ``loss_fn`` call; ``ok`` is False when the losses at the
  current point are not finite (``criterion='transference'``)."""
  leaves = jax.tree.leaves(stacked)
  displacements = [
      -jnp.asarray(lookahead_lr, jnp.result_type(jnp.float32, d.dtype))
      * d.astype(jnp.result_type(jnp.float32, d.dtype)) for d in leaves]
  with_base = criterion == "transference"
  out = _lookahead_losses(loss_fn, params, [True] * len(leaves),
                          displacements, leaves[0].shape[0], with_base)
  if out.shape[1] != num_tasks:
    raise ValueError(f"{method}: loss_fn returns {out.shape[1]} task losses "
                     f"but the gradients have {num_tasks} tasks.")
  acc = jnp.result_type(jnp.float32, out.dtype)
  after = out[1:] if with_base else out
  terms = _transference(out[0], after) if with_base else after.astype(acc)
  scores, usable = _scores(terms, after, acc)
  key = -scores if with_base else scores
  choice = jnp.argmin(jnp.where(usable, key, jnp.inf)).astype(jnp.int32)
  # Non-finite losses at the current point are non-finite input: NaN update
  # (apply_if_finite skips it), state kept. Look-aheads that all overflow
  # (finite but huge steps) leave the first candidate, as documented.
  ok = jnp.all(jnp.isfinite(out[0])) if with_base else jnp.array(True)
  return choice, scores, ok


def it_mtl(
    num_tasks: int,
    candidates: Optional[Sequence[optax.GradientTransformation]] = None,
    lookahead_lr: float | jax.Array = 1e-3,
    criterion: str = "transference",
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """IT-MTL: apply the candidate update with the best look-ahead.

  Fifty et al., "Measuring and Harnessing Transference in Multi-Task
  Learning", arXiv:2010.15413 (increased-transfer MTL; the successor TAG
  paper is arXiv:2109.04617). Every step each candidate aggregator ``c``
  proposes ``d_c``; the look-ahead ``theta_c' = theta - lookahead_lr d_c`` is
  scored on the current batch and the best candidate's ``d_c`` is returned:
  ``c* = argmax_c sum_j (1 - L_j(theta_c') / L_j(theta))`` (total
  transference, ``criterion='transference'``) or
  ``c* = argmin_c sum_j L_j(theta_c')`` (``criterion='loss'``).

  .. math::

     d &= d_{c^\\star}, \\\\
     c^\\star &= \\arg\\max_c \\sum_j \\Big( 1 -
     \\frac{L_j(\\theta - \\eta\\, d_c)}{L_j(\\theta)} \\Big)
     \\quad (\\texttt{criterion='transference'})

  All candidates' look-aheads (and, for transference, the current point) are
  evaluated by ONE vmapped call of the ``loss_fn`` extra argument; the
  selection is an index, not Python branching, so the whole step jits.
  Output scale: that of the candidates (the defaults return ``g0`` scale).
  Cost: the candidates' aggregation plus ``C`` (or ``C + 1``) forward passes.
  Inside ``optax.partition`` the look-ahead moves only the partition's
  (shared) leaves, heads fixed as in the paper.

  Scores are kept in the finite range: ratios and sums that overflow (for
  1e30-scale or mixed 1e30/1e-30 gradients) saturate at ``+-finfo.max``. A
  candidate whose look-ahead losses are not finite never wins and scores 0;
  if no look-ahead is finite (e.g. finite 1e30 gradients whose look-ahead
  losses overflow) the first candidate is applied. A step with non-finite
  gradients or ``task_losses``, or non-finite losses at the current point
  (``criterion='transference'``), leaves the state unchanged and returns a
  NaN update (for ``optax.apply_if_finite``).

  Args:
    num_tasks: number of tasks K.
    candidates: aggregators built for ``num_tasks`` whose states have a
      ``weights`` field; default the mean gradient
      (``mo.linear_scalarization``) and ``mo.pcgrad``, the paper's pair.
    lookahead_lr: SGD step of the look-ahead (use the optimiser's learning
      rate). Injectable.
    criterion: ``'transference'`` or ``'loss'``, as above.
    seed: seed of the default PCGrad candidate.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ITMTLState`.

  Example (PCGrad's step lowers the total loss more than the mean's):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> loss_fn = lambda w: jnp.stack([(w[0] - 1.) ** 2 + 1., (w[0] + w[1]) ** 2])
    >>> w = jnp.array([0., 1.])
    >>> losses, grads = mo.value_and_task_grads(loss_fn)(w)
    >>> tx = mo.it_mtl(2, lookahead_lr=0.5, criterion='loss')
    >>> update, state = tx.update(grads, tx.init(w), w, loss_fn=loss_fn)
    >>> print(int(state.choice), np.asarray(state.scores, np.float64).round(4))
    1 [2.25   1.8125]
    >>> print(np.asarray(update, np.float64).round(4), np.asarray(state.weights, np.float64).round(4))
    [-0.5  1.5] [1.   0.75]
  """
  method = "it_mtl"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(lookahead_lr, "lookahead_lr", method)
  if criterion not in CRITERIA:
    raise ValueError(f"{method}: criterion must be one of {CRITERIA}, got "
                     f"{criterion!r}.")
  candidates = _it_mtl_candidates(candidates, num_tasks, seed, method)
  num_candidates = len(candidates)

  def step(updates, state, params, extra_args):
    _check_stacked_on(updates, params, method, "updates")
    loss_fn = _checked_loss_fn(params, extra_args, method)
    dtype = state.weights.dtype
    stacked, weights, new_states = _proposals(
        candidates, updates, state.candidate_states.value, params, extra_args,
        num_tasks, method)
    weights = weights.astype(dtype)
    choice, scores, ok = _best_candidate(
        loss_fn, params, stacked, lookahead_lr, criterion, num_tasks, method)
    update = jax.tree.map(lambda d: d[choice], stacked)
    if extra_args.get("task_losses") is not None:
      ok &= jnp.all(jnp.isfinite(jnp.asarray(extra_args["task_losses"])))
    update = base.nan_unless(ok, update)
    wins = state.wins + jax.nn.one_hot(choice, num_candidates, dtype=jnp.int32)
    new_state = ITMTLState(weights[choice], choice, scores.astype(dtype), wins,
                           base.Opaque(tuple(new_states)))
    finite = base.all_finite(update) & base.all_finite(new_state.weights)
    return update, new_state, finite

  return base.guarded_transformation(
      num_tasks, method,
      lambda params: _it_mtl_init(candidates, params, num_tasks, method), step)


# --------------------------------------------------------------------------
# TAG network selection (host side).


class TaskGrouping(NamedTuple):
  """Result of :func:`select_task_groups`.

  Attributes:
    groups: the chosen networks, each a sorted tuple of tasks (names when
      the affinities came with names, else indices), sorted.
    score: ``mean_a max_{S in groups, a in S} s_S(a)``, the TAG objective.
    served_by: for each task (in input order), the index in ``groups`` of
      the network that serves it (its best-scoring group).
    task_scores: for each task, its score ``s_S(a)`` in that network.
  """
  groups: tuple
  score: float
  served_by: tuple
  task_scores: tuple


def _as_matrix(affinity: Any, task_names: Optional[Sequence[str]]):
  """(Z as float64 ndarray, names or None) from an array or TAG's dict."""
  if isinstance(affinity, Mapping):
    names = list(affinity)
    try:
      d = np.array([[float(affinity[a][b]) for b in names] for a in names])
    except KeyError as err:
      raise ValueError("select_task_groups: the affinity dictionary must be "
                       f"complete (D[a][b] for every pair); missing {err}.")
    return d.T, names  # D[a][b] = Z[b][a]
  z = np.asarray(affinity, np.float64)
  if z.ndim != 2 or z.shape[0] != z.shape[1] or z.shape[0] < 1:
    raise ValueError("select_task_groups: affinity must be a square (K, K) "
                     f"matrix, got shape {z.shape}.")
  if task_names is not None:
    task_names = list(task_names)
    if len(task_names) != z.shape[0]:
      raise ValueError(f"select_task_groups: {len(task_names)} task_names for "
                       f"{z.shape[0]} tasks.")
  return z, task_names


def _member_scores(z: np.ndarray, singleton_score: float) -> np.ndarray:
  """``s[S, a]`` for every subset bitmask S: mean_{b in S, b != a} Z[b, a]
  for members a of S (the affinity onto a), -inf for non-members."""
  k = z.shape[0]
  masks = np.arange(1 << k)
  member = ((masks[:, None] >> np.arange(k)) & 1).astype(bool)  # (2^K, K)
  off = z - np.diag(np.diag(z))
  sums = member.astype(np.float64) @ off  # sums[S, a] = sum_{b in S} Z[b, a]
  sizes = member.sum(1, keepdims=True)
  scores = sums / np.maximum(sizes - 1, 1)
  scores = np.where(sizes == 1, singleton_score, scores)
  return np.where(member, scores, -np.inf)


def _best_supersets(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(best, best_superset)`` over subset bitmasks P: ``best[P]`` is the
  maximum over supersets S of P of ``sum_{a in P} s_S(a)``, attained at
  ``S = best_superset[P]`` (``O(3^K)``)."""
  k = scores.shape[1]
  best = np.full(1 << k, -np.inf)
  best_superset = np.zeros(1 << k, np.int64)
  best[0] = 0.0
  for s in range(1, 1 << k):
    members = [a for a in range(k) if s >> a & 1]
    bits = ((np.arange(1 << len(members))[:, None] >> np.arange(len(members)))
            & 1)
    subs = bits @ (1 << np.array(members, np.int64))
    sums = bits @ scores[s, members]
    better = sums > best[subs]
    best[subs[better]] = sums[better]
    best_superset[subs[better]] = s
  return best, best_superset


def _best_partition(best: np.ndarray, budget: int) -> list:
  """The blocks (bitmasks) of the partition of all tasks into at most
  ``budget`` blocks maximising ``sum_P best[P]``; fewer blocks win ties
  (``O(budget 3^K)``)."""
  k = int(best.shape[0]).bit_length() - 1
  # f[m][U]: best sum over partitions of U into <= m blocks (block holding
  # U's lowest task is chosen first, so each partition is seen once).
  f = np.full((budget + 1, 1 << k), -np.inf)
  f[:, 0] = 0.0
  choice = np.zeros((budget + 1, 1 << k), np.int64)
  for m in range(1, budget + 1):
    for u in range(1, 1 << k):
      low = u & -u
      rest = u ^ low
      top, top_block = f[m - 1][u], 0  # fewer blocks win ties
      q = rest
      while True:
        block = q | low
        value = best[block] + f[m - 1][u ^ block]
        if value > top:
          top, top_block = value, block
        if q == 0:
          break
        q = (q - 1) & rest
      f[m][u] = top
      choice[m][u] = top_block
  blocks, u, m = [], (1 << k) - 1, budget
  while u:
    while m > 1 and f[m - 1][u] >= f[m][u]:
      m -= 1
    block = choice[m][u]
    blocks.append(block)
    u ^= block
    m -= 1
  return blocks


def select_task_groups(
    affinity: Any,
    budget: int,
    *,
    task_names: Optional[Sequence[str]] = None,
    singleton_score: float = SINGLETON_SCORE,
) -> TaskGrouping:
  """TAG's network selection: the best ``<= budget`` (overlapping) groups.

  Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
  Learning", NeurIPS 2021 (arXiv:2109.04617), as in the official
  ``TAG_network_selection`` notebook. A group ``S`` scores each member
  ``s_S(a) = mean_{b in S, b != a} Z[b, a]`` (the mean affinity onto ``a``);
  a singleton scores ``singleton_score`` (-1e6: a task alone is essentially
  never chosen). A network set is any collection of at most ``budget`` task
  subsets that covers every task (they may overlap); each task is served by
  the chosen group where its score is highest; the set maximising
  ``mean_a max_{S ∋ a} s_S(a)`` is returned.

  The search is exact and needs no enumeration of the ``C(2^K - 1, B)`` sets.
  An optimal set induces a partition of the tasks by serving group, and for
  a fixed partition each block ``P`` independently takes its best superset,
  ``best(P) = max_{S ⊇ P} sum_{a in P} s_S(a)``. So the optimum is the best
  partition into at most ``budget`` blocks of ``sum_P best(P)``: a dynamic
  program over subsets, ``O(3^K)`` for ``best`` and ``O(budget 3^K)`` for the
  partition (9 tasks, budget 4: milliseconds). Ties go to fewer groups. This
  is host-side NumPy: it runs once after training, not per step.

  Args:
    affinity: either a ``(K, K)`` array in :func:`task_affinity`'s
      orientation (``Z[i, j]``: effect of a step on ``i`` on ``j``; e.g.
      ``TrackAffinityState.affinity``), or a dictionary of dictionaries in
      TAG's published orientation, ``D[a][b] = Z[b][a]`` (outer key: the
      receiving task), whose keys name the tasks.
    budget: the maximum number of networks (``splits`` in the notebook).
    task_names: optional names for an array input.
    singleton_score: the score of a task alone in its group.

  Returns:
    A :class:`TaskGrouping`.

  Example:
    >>> import numpy as np, mtl_optax as mo
    >>> z = np.array([[0., .5, -.2, -.1], [.4, 0., -.3, 0.], [-.2, -.1, 0., .6],
    ...               [0., -.2, .3, 0.]])
    >>> print(round(mo.select_task_groups(z, 1).score, 4))
    0.0583
    >>> result = mo.select_task_groups(z, 2, task_names=['a', 'b', 'c', 'd'])
    >>> print(result.groups, round(result.score, 4), result.served_by)
    (('a', 'b'), ('c', 'd')) 0.45 (0, 0, 1, 1)
  """
  method = "select_task_groups"
  z, names = _as_matrix(affinity, task_names)
  if not np.all(np.isfinite(z)):
    raise ValueError(f"{method}: affinity has non-finite entries.")
  if isinstance(budget, bool) or int(budget) != budget or budget < 1:
    raise ValueError(f"{method}: budget must be an int >= 1, got {budget!r}.")
  k = z.shape[0]
  if k > 16:
    raise ValueError(f"{method}: the exact search is O(3^K); K = {k} > 16 is "
                     "too large.")
  budget = min(int(budget), k)
  scores = _member_scores(z, singleton_score)
  best, best_superset = _best_supersets(scores)
  blocks = _best_partition(best, budget)
  group_masks = sorted({int(best_superset[b]) for b in blocks},
                       key=lambda s: [a for a in range(k) if s >> a & 1])
  group_scores = scores[group_masks]  # (G, K)
  served_by = np.argmax(group_scores, axis=0)
  task_scores = group_scores[served_by, np.arange(k)]
  label = (lambda a: names[a]) if names is not None else (lambda a: a)
  groups = tuple(tuple(label(a) for a in range(k) if s >> a & 1)
                 for s in group_masks)
  return TaskGrouping(groups, float(np.mean(task_scores)),
                      tuple(int(i) for i in served_by),
                      tuple(float(x) for x in task_scores))

