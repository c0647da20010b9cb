"""The one place that turns a weighting rule into an optax transformation.

Most methods in the library compute per-task coefficients ``c`` (from the
Gram matrix, their state, the losses or the extra arguments) and return the
update ``sum_i c_i g_i``. :func:`guarded_transformation` is the one builder:
it owns the trace-time checks, the stacked-or-not decision, the probe
protocol of loss weightings, the finiteness guard and the keep-the-old-state
select. Its two specialisations add the rest:
:func:`task_weighting_transformation` (Gram weightings: the single Gram
pass and the weighted sum) and
:func:`loss_weighting_transformation` (loss weightings: one ordinary
gradient or the weighted sum of stacked ones, coefficients from the state
and the losses), so each method's module contains only its math.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import eager
from mtl_optax._src import tree_math
from mtl_optax._src import validation


def state_dtype(params: Any) -> jnp.dtype:
  """Float dtype for K-shaped state: float32, or float64 for float64 params."""
  floats = [jnp.asarray(x).dtype for x in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.result_type(jnp.float32, *floats) if floats else jnp.float32


class WeightingContext(NamedTuple):
  """What a weighting rule sees at each step.

  Attributes:
    gram: the normalised Gram matrix (trace K), or None for rules built with
      ``needs_gram=False``.
    rms_norm: RMS of the task-gradient norms (``A = gram * rms_norm**2``), or
      None likewise.
    task_losses: the ``task_losses`` extra argument, or None.
    extra_args: every extra keyword argument, for rules that need more.
    dtype: the dtype of the state's float fields.
  """
  gram: Optional[jax.Array]
  rms_norm: Optional[jax.Array]
  task_losses: Optional[jax.Array]
  extra_args: dict
  dtype: jnp.dtype


class ScaledCoefficients(NamedTuple):
  """What a weighting rule may return instead of plain coefficients:
  ``update = scale * sum_i coefficients[i] g_i``.

  For rules whose true coefficients leave the float range while the update
  does not (FairGrad's scale ``|g|^(-2 alpha / (1 + alpha))``): the sum is
  formed with representable coefficients, then scaled.
  """
  coefficients: jax.Array
  scale: jax.Array


@eager.compiled_when_eager
def all_finite(tree: Any) -> jax.Array:
  """One boolean: every element of every floating leaf of ``tree`` is finite."""
  # Small leaves are checked together: one kernel, not one per leaf.
  checks = [jnp.all(jnp.isfinite(x))
            for x in tree_math.whole_tree_operands(tree)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


@eager.compiled_when_eager
def keep_if_finite(finite: jax.Array, new: Any, old: Any) -> Any:
  """``new`` where ``finite``, else ``old``, leaf by leaf, in ``old``'s dtypes.

  The one "keep the previous state after a non-finite step" select: a
  NaN/inf step must not poison warm starts, EMAs or keys.
  """
  return jax.tree.map(
      lambda n, o: jnp.where(finite, jnp.asarray(n).astype(jnp.asarray(o).dtype),
                             o), new, old)


@eager.compiled_when_eager
def nan_unless(finite: jax.Array, tree: Any) -> Any:
  """``tree``, or NaN everywhere (same dtypes) when ``finite`` is False, so
  that ``optax.apply_if_finite`` downstream skips the step."""
  return jax.tree.map(lambda u: jnp.where(finite, u, jnp.nan).astype(u.dtype),
                      tree)


def is_unstacked(updates: Any, params: Any) -> bool:
  """Whether ``updates`` is one ordinary gradient: shaped leaf by leaf like
  ``params`` (False without ``params``)."""
  if params is None:
    return False
  u_leaves, p_leaves = jax.tree.leaves(updates), jax.tree.leaves(params)
  return len(u_leaves) == len(p_leaves) and all(
      jnp.shape(u) == jnp.shape(p) for u, p in zip(u_leaves, p_leaves))


def stacked_or_unstacked(updates: Any, params: Any, num_tasks: int,
                         method: str) -> bool:
  """True for stacked per-task gradients, False for one ordinary gradient
  shaped like ``params`` (the single-backward path).

  Raises the library's clear shape error for anything else, with the hint
  to pass ``params`` when they are missing.
  """
  hint = ("" if params is not None else
          " On the single-backward path (mo.value_and_weighted_grad) pass "
          "params to update so that an ordinary gradient is recognised.")
  if is_stacked(updates, params, num_tasks):
    try:
      validation.check_task_axis(updates, num_tasks, method)
    except ValueError as err:
      raise ValueError(str(err) + hint) from None
    return True
  if is_unstacked(updates, params):
    return False
  validation.check_task_axis(updates, num_tasks, method)
  raise ValueError(
      f"{method}: updates are neither one gradient shaped like params nor "
      f"stacked per-task gradients with a leading axis of size {num_tasks}.")


def _checked_input(updates, state, params, extra_args, num_tasks, method,
                   accepts_gram, accepts_unstacked) -> bool:
  """The builder's trace-time checks of ``update``'s input; whether the
  updates are stacked."""
  stacked = True
  if accepts_unstacked:
    # A loss weighting: a ``gram`` extra argument (the Gram-first path,
    # where the gradient is an ordinary one) is not read.
    stacked = stacked_or_unstacked(updates, params, num_tasks, method)
  elif extra_args.get(GRAM_ARG) is None:
    validation.check_task_axis(updates, num_tasks, method)
    validation.check_stacked_like_params(updates, params, num_tasks, method)
  else:
    check_gram_arg(extra_args[GRAM_ARG], num_tasks, method, accepts_gram)
  validation.check_float_leaves(updates, method)
  validation.check_state_tasks(state, num_tasks, method)
  return stacked


def guarded_transformation(
    num_tasks: int,
    method: str,
    init_fn: Callable[[Any], NamedTuple],
    step: Callable[..., tuple],
    requires_task_losses: bool = False,
    accepts_gram: bool = False,
    passes_unstacked_through: bool = False,
    accepts_unstacked: bool = False,
    probe: Optional[Callable[[NamedTuple, dict], NamedTuple]] = None,
    requires_params: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
  """The one builder: the optax plumbing every method shares.

  Around ``step(updates, state, params, extra_args) -> (update, new_state,
  finite)`` it does the trace-time checks (leading task axis, floating-point
  leaves, leaf shapes ``(K, *param.shape)`` when ``params`` is given, the
  state's ``weights`` built for K tasks, ``task_losses`` shape), passes empty
  trees through, and keeps the previous state when
  ``finite`` is False: a NaN/inf step returns its non-finite update, for
  ``optax.apply_if_finite`` downstream to skip, but does not poison warm
  starts, EMAs or keys. State dtypes stay fixed across steps (jit carries,
  ``lax.cond``).

  ``step`` may return ``(update, new_state)`` only: the step then counts as
  finite when the new ``weights`` and the update are (methods that compute
  the update themselves rather than from a Gram matrix).

  Options:

  * ``accepts_gram``: the method also runs on the Gram-first path: given
    the extra argument ``gram`` (:data:`GRAM_ARG`), ``updates`` is one
    ordinary gradient (no task axis) and ``step`` must take its coefficients
    from the given Gram matrix.
  * ``passes_unstacked_through``: one ordinary gradient (shaped like
    ``params``) is returned unchanged, state and all (the heads' rule
    :func:`mtl_optax.task_sum`).
  * ``accepts_unstacked``: ``updates`` may also be one ordinary gradient
    shaped like ``params`` (the single-backward path; recognised only when
    ``params`` is given, and the error says so); ``step`` is then called as
    ``step(updates, state, params, extra_args, stacked)`` with ``stacked``
    a Python bool. A ``gram`` extra argument is not read.
  * ``probe``: ``(state, extra_args) -> state`` makes the result a
    :class:`LossWeightingTransformation`: called with
    ``weighting_probe=True`` (:data:`PROBE_ARG`), ``update`` returns its
    input unchanged and ``probe``'s state, whose ``weights`` are the
    coefficients the real update on this state would use (nothing else
    advanced). ``task_losses`` is checked before.
  * ``requires_params``: ``update`` without ``params`` is a trace-time
    error, this text saying why.
  """

  def update_fn(updates, state, params=None, **extra_args):
    if passes_unstacked_through and is_unstacked(updates, params):
      return updates, state
    losses = extra_args.get("task_losses")
    if probe is not None:
      validation.check_task_losses(losses, num_tasks, method,
                                   required=requires_task_losses)
      if extra_args.get(PROBE_ARG):
        return updates, probe(state, extra_args)
    if requires_params is not None and params is None:
      raise ValueError(f"{method}: update needs params ({requires_params}).")
    stacked = _checked_input(updates, state, params, extra_args, num_tasks,
                             method, accepts_gram, accepts_unstacked)
    if probe is None:
      validation.check_task_losses(losses, num_tasks, method,
                                   required=requires_task_losses)
    if not jax.tree.leaves(updates):
      return updates, state
    out = (step(updates, state, params, extra_args, stacked)
           if accepts_unstacked else step(updates, state, params, extra_args))
    if len(out) == 2:
      update, new_state = out
      finite = all_finite(new_state.weights) & all_finite(update)
    else:
      update, new_state, finite = out
    return update, keep_if_finite(finite, new_state, state)

  if probe is not None:
    return LossWeightingTransformation(init_fn, update_fn)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def finite_if_weights_and_update_are(step):
  """No-op kept for steps written against the older two-part builder: a
  ``step`` returning ``(update, new_state)`` already gets this check from
  :func:`guarded_transformation`."""
  return step


def task_weighting_transformation(
    num_tasks: int,
    method: str,
    init_state: Callable[[jnp.dtype], NamedTuple],
    weights_rule: Callable[[WeightingContext, NamedTuple],
                           tuple[jax.Array, NamedTuple]],
    needs_gram: bool = True,
    requires_task_losses: bool = False,
    passes_unstacked_through: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a transformation ``stacked grads -> sum_i c_i g_i``: the
  Gram-weighting specialisation of :func:`guarded_transformation`.

  Args:
    num_tasks: K, already validated.
    method: the method's public name, used in error messages.
    init_state: ``dtype -> State``; the state must have a ``weights`` field.
    weights_rule: ``(context, state) -> (coefficients (K,), new_state)``;
      the coefficients may be a :class:`ScaledCoefficients`.
    needs_gram: whether the rule reads the Gram matrix (one pass over the
      gradients); rules that do not (fixed weights) skip it.
    requires_task_losses: raise at trace time if ``task_losses`` is missing.
    passes_unstacked_through: see :func:`guarded_transformation`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. A step counts as non-finite
    when the Gram matrix or the coefficients are (K x K work, no extra pass
    over the gradients).
  """

  def init_fn(params):
    return init_state(state_dtype(params))

  def step(updates, state, params, extra_args):
    del params
    dtype = state.weights.dtype
    given = extra_args.get(GRAM_ARG)
    if not needs_gram:
      gram = rms_norm = None
    else:
      normalized = (normalize_given_gram(given) if given is not None
                    else tree_math.normalized_gram(updates))
      gram = normalized.gram.astype(jnp.promote_types(dtype, jnp.float32))
      rms_norm = normalized.rms_norm
    context = WeightingContext(gram, rms_norm, extra_args.get("task_losses"),
                               extra_args, dtype)
    coefficients, new_state = weights_rule(context, state)
    scale = None
    if isinstance(coefficients, ScaledCoefficients):
      coefficients, scale = coefficients
    finite = jnp.all(jnp.isfinite(coefficients))
    if gram is not None:
      finite &= jnp.all(jnp.isfinite(gram))
    if given is None:
      if scale is not None:
        finite &= jnp.isfinite(scale)
      return combine_tasks(coefficients, scale, updates), new_state, finite
    # Gram-first: ``updates`` is already grad sum_i c_i L_i, computed by the
    # caller with these coefficients (its probe ran this same rule).
    if not extra_args.get(PROBE_ARG):
      finite &= all_finite(updates)
    return nan_unless(finite, updates), new_state, finite

  return guarded_transformation(
      num_tasks, method, init_fn, step, requires_task_losses,
      accepts_gram=True, passes_unstacked_through=passes_unstacked_through)


def _has_narrow_range(tree: Any) -> bool:
  """Whether a floating leaf's dtype overflows far below float32 (float16)."""
  return any(jnp.finfo(x.dtype).max < 1e38 for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


@eager.compiled_when_eager
def combine_tasks(coefficients: jax.Array, scale: Optional[jax.Array],
                  stacked: Any) -> Any:
  """The update ``scale * sum_i c_i g_i`` (``scale`` None: 1).

  With float16 leaves, whose range a sum of K gradients (or a method whose
  update is longer than their mean, such as CAGrad with ``rescale=0``) can
  leave, the sum is formed in float32 and, only where it would overflow,
  scaled down to fit (:func:`weighted_sum_in_range`: direction kept). The
  choice is static, so other dtypes pay nothing.
  """
  if _has_narrow_range(stacked):
    if scale is not None:
      coefficients = coefficients * scale.astype(coefficients.dtype)
    return weighted_sum_in_range(coefficients, stacked)[0]
  update = tree_math.weighted_task_sum(coefficients, stacked)
  if scale is None:
    return update
  return jax.tree.map(
      lambda u: (u.astype(jnp.promote_types(u.dtype, scale.dtype))
                 * scale).astype(u.dtype), update)


def uniform_weights(num_tasks: int, dtype: jnp.dtype) -> jax.Array:
  return jnp.full((num_tasks,), 1.0 / num_tasks, dtype)


def finite_or(value: jax.Array, fallback: jax.Array) -> jax.Array:
  """``value`` if all finite, else ``fallback`` (e.g. a poisoned warm start)."""
  return jnp.where(jnp.all(jnp.isfinite(value)), value, fallback)


def poison_if_nonfinite(values: jax.Array, gram: jax.Array) -> jax.Array:
  """``values``, or NaN everywhere when ``gram`` is not finite.

  Eigendecompositions and solvers may return finite numbers for a NaN input;
  this makes the whole update NaN, for ``optax.apply_if_finite`` to skip.
  """
  return jnp.where(jnp.all(jnp.isfinite(gram)), values, jnp.nan)


PrefVector = Optional[Sequence[float] | jax.Array]


def preference_vector(pref_vector: PrefVector, num_tasks: int, method: str,
                      default: float) -> Callable[[jnp.dtype], jax.Array]:
  """Checks a preference vector's shape; returns ``dtype -> (K,) array``.

  ``None`` gives the constant vector ``default``. Values may be traced (e.g.
  injected by ``optax.inject_hyperparams``); only the shape is checked, at
  construction.
  """
  if pref_vector is not None and np.shape(pref_vector) != (num_tasks,):
    raise ValueError(
        f"{method}: pref_vector has shape {tuple(np.shape(pref_vector))}, "
        f"expected ({num_tasks},) (one preference per task).")

  def make(dtype):
    if pref_vector is None:
      return jnp.full((num_tasks,), default, dtype)
    return jnp.asarray(pref_vector, dtype)
  return make


class LossWeightingTransformation(optax.GradientTransformationExtraArgs):
  """A transformation on the single-backward path (one weighted-loss gradient).

  Its coefficients ``c`` depend only on its state and the task losses, so the
  training step takes the gradient of ONE weighted loss ``sum_i c_i L_i``
  (:func:`mtl_optax.value_and_weighted_grad`): one forward and one backward
  pass whatever K is. ``update(grads, state, params, task_losses=...,
  loss_fn=...)`` receives that ordinary (unstacked) gradient, returns the
  update (usually the gradient itself) and advances the state from the extra
  arguments. Methods that also accept stacked per-task gradients combine
  them with the same coefficients (``sum_i c_i g_i``), so both paths give
  the same update.

  The coefficients are read through ``update`` itself: called with the extra
  argument ``weighting_probe=True`` (``PROBE_ARG``), it returns its input
  unchanged and its state with ``weights`` set to the coefficients the real
  ``update`` on the same state and losses uses, without advancing anything
  else. So wrappers (``optax.chain``, ``optax.partition``,
  ``optax.inject_hyperparams``) need nothing special, and injected
  hyper-parameters are the ones used.
  """

  def loss_weights(self, state: Any, task_losses: jax.Array) -> jax.Array:
    """The coefficients ``c`` the next ``update`` on ``state`` uses for
    ``task_losses`` (one probe of ``update``; the state is not advanced)."""
    _, probed = self.update((), state, None, task_losses=task_losses,
                            **{PROBE_ARG: True})
    return probed.weights


class LossStep(NamedTuple):
  """What a loss weighting's state-advance rules may read besides the
  losses: the updates, whether they are stacked, ``params`` and every extra
  argument."""
  updates: Any
  stacked: bool
  params: Any
  extra_args: dict


@eager.compiled_when_eager
def weighted_sum_in_range(coeffs: jax.Array, stacked: Any,
                          like: Any = None) -> tuple[Any, jax.Array]:
  """``sum_i c_i g_i`` in the dtypes of ``like`` (default ``stacked``),
  computed in float32 or wider, never overflowing for finite input.

  Reciprocal-loss coefficients (``1 / (L + eps)`` for a zero loss) can exceed
  the range of float16 gradients, or times large gradients that of float32.
  The sum is taken with ``c / sum|c|``, a combination that cannot leave the
  gradients' range (with ``c / max|c|`` a sum of K gradients near the
  dtype's largest value overflowed although ``sum c_i g_i`` did not), and
  multiplied back by ``sum|c|``, or by less where a leaf would then pass half
  its dtype's largest value: the direction is kept and the length capped.
  NaN/inf stay non-finite.

  Returns:
    The update and ``r <= 1`` (1 when nothing was capped): the update is
    ``sum_i (r c_i) g_i``.
  """
  like = stacked if like is None else like
  total = jnp.sum(jnp.abs(coeffs))
  safe = jnp.where(total > 0, total, 1.0)
  acc = jnp.result_type(tree_math.accumulation_dtype(stacked), coeffs.dtype)
  sums = tree_math.weighted_task_sum(
      coeffs.astype(acc) / safe, jax.tree.map(lambda g: g.astype(acc), stacked))
  sum_leaves, like_leaves = jax.tree.leaves(sums), jax.tree.leaves(like)
  factor = safe.astype(acc)
  # One peak per output dtype's whole-tree operand (the small leaves of a
  # dtype in one reduction, not a kernel per leaf: the room is the dtype's,
  # so the cap is the per-leaf one), stacked before the minimum: a chain of
  # minimums over the leaves made XLA repeat every leaf's reduction inside
  # every leaf's output kernel (quadratic in the leaves).
  tops, rooms = [], []
  for dtype in dict.fromkeys(jnp.dtype(y.dtype) for y in like_leaves):
    for x in tree_math.whole_tree_operands(
        [x for x, y in zip(sum_leaves, like_leaves) if y.dtype == dtype]):
      tops.append(jnp.max(jnp.abs(x)))
      rooms.append(jnp.finfo(dtype).max / 2)
  if tops:
    tops, rooms = jnp.stack(tops), jnp.asarray(rooms, acc)
    fits = jnp.where(tops > 0, rooms / jnp.where(tops > 0, tops, 1.0), factor)
    factor = jnp.minimum(factor, jnp.min(fits))
  out = jax.tree.map(lambda x, y: (x * factor).astype(y.dtype), sums, like)
  return out, (factor / safe).astype(coeffs.dtype)


def loss_weighting_transformation(
    num_tasks: int,
    method: str,
    init_state: Callable[[jnp.dtype], NamedTuple],
    coefficients: Callable[[NamedTuple, jax.Array], jax.Array],
    advance: Callable[[NamedTuple, jax.Array, jax.Array, LossStep],
                      NamedTuple],
    prepare: Optional[Callable[[NamedTuple, jax.Array, Optional[LossStep]],
                               NamedTuple]] = None,
    requires_task_losses: bool = True,
    requires_params: Optional[str] = None,
) -> LossWeightingTransformation:
  """Builds a loss weighting from its rules: the single-backward
  specialisation of :func:`guarded_transformation`.

  ``update`` takes one ordinary gradient (returned as it is) or stacked
  per-task gradients (returned as ``sum_i c_i g_i``, never overflowing, see
  :func:`weighted_sum_in_range`; ``weights`` records the coefficients
  used), and honours the probe protocol (:data:`PROBE_ARG`). Non-finite
  losses make the update NaN; a non-finite step keeps the previous state.

  Args:
    num_tasks: K, already validated.
    method: public name, for error messages.
    init_state: ``dtype -> State`` (a NamedTuple with a ``weights`` field).
    coefficients: ``(state, losses) -> c`` (K,): the loss weights of this step.
    advance: ``(state, losses, c, step) -> new_state``.
    prepare: optional ``(state, losses, step) -> state``, the part of the
      state advance that the coefficients depend on (FAMO's pending logit
      step, PSMGD's solve); run once per ``update``, before the other two
      rules, and by the probe with ``step=None``.
    requires_task_losses: False for rules that do not read the losses
      (RLW): a missing ``task_losses`` then stands for zeros.
    requires_params: see :func:`guarded_transformation`.

  Returns:
    A :class:`LossWeightingTransformation`.
  """
  register_loss_weighting_state(type(init_state(jnp.float32)))

  def init_fn(params):
    return init_state(state_dtype(params))

  def losses_of(state, extra_args):
    task_losses = extra_args.get("task_losses")
    if task_losses is None:
      task_losses = jnp.zeros((num_tasks,))
    return jnp.asarray(task_losses).astype(state.weights.dtype)

  def probe(state, extra_args):
    losses = losses_of(state, extra_args)
    prepared = state if prepare is None else prepare(state, losses, None)
    return state._replace(weights=coefficients(prepared, losses))

  def step(updates, state, params, extra_args, stacked):
    losses = losses_of(state, extra_args)
    context = LossStep(updates, stacked, params, extra_args)
    prepared = state if prepare is None else prepare(state, losses, context)
    coeffs = coefficients(prepared, losses)
    new_state = advance(prepared, losses, coeffs, context)
    losses_ok = jnp.all(jnp.isfinite(losses))
    if stacked:
      # Non-finite losses make the coefficients NaN and with them the whole
      # sum: one select on K values, where one per leaf costs a kernel each.
      out, capped = weighted_sum_in_range(
          jnp.where(losses_ok, coeffs, jnp.nan), updates)
      new_state = new_state._replace(weights=coeffs * capped)
    else:
      out = nan_unless(losses_ok, updates)
    finite = losses_ok & jnp.all(jnp.isfinite(coeffs)) & all_finite(out)
    return out, new_state, finite

  return guarded_transformation(
      num_tasks, method, init_fn, step, requires_task_losses,
      accepts_unstacked=True, probe=probe, requires_params=requires_params)


def is_stacked(updates: Any, params: Any, num_tasks: int) -> bool:
  """Whether ``updates`` carries a leading task axis relative to ``params``.

  With ``params`` given the answer is unambiguous (every stacked leaf is
  shaped ``(K, *param.shape)``); without them, updates are taken as stacked.
  """
  if params is None:
    return True
  u_leaves, p_leaves = jax.tree.leaves(updates), jax.tree.leaves(params)
  if len(u_leaves) != len(p_leaves):
    return True
  return all(tuple(jnp.shape(u)) == (num_tasks,) + tuple(jnp.shape(p))
             for u, p in zip(u_leaves, p_leaves))


# ---------------------------------------------------------------------------
# The training-step protocol: probes, given Gram matrices, method states.
# ---------------------------------------------------------------------------

#: Extra argument of ``update`` asking a method for the coefficients it will
#: use on this state and these losses (recorded in ``weights``), without
#: advancing its state: :func:`mtl_optax.value_and_weighted_grad` calls
#: ``tx.update(zeros, opt_state, params, task_losses=..., weighting_probe=True)``
#: once, reads the coefficients, and discards the rest (dead code under jit).
PROBE_ARG = "weighting_probe"

#: Extra argument of ``update`` carrying the K x K Gram matrix of the task
#: gradients (a raw ``(K, K)`` array or a ``tree_math.NormalizedGram``): the
#: Gram-first path, where ``updates`` is one ordinary gradient.
GRAM_ARG = "gram"


def check_gram_arg(gram: Any, num_tasks: int, method: str,
                   accepts_gram: bool) -> None:
  """Trace-time check of the ``gram`` extra argument."""
  if not accepts_gram:
    raise ValueError(
        f"{method}: is not a Gram-weighting method, so it cannot take the "
        "gram= extra argument (the Gram-first path, "
        "mo.value_and_gram_weighted_grad); give it stacked per-task "
        "gradients (mo.value_and_task_grads).")
  shape = jnp.shape(gram.gram if isinstance(gram, tree_math.NormalizedGram)
                    else gram)
  if shape != (num_tasks, num_tasks):
    raise ValueError(f"{method}: gram has shape {tuple(shape)}, expected "
                     f"({num_tasks}, {num_tasks}).")


def normalize_given_gram(gram: Any) -> tree_math.NormalizedGram:
  """A given Gram matrix, normalised as ``tree_math.normalized_gram`` does.

  ``A / (trace(A) / K)`` with the RMS task-gradient norm
  ``sqrt(trace(A) / K)``; all zeros when ``A`` is; NaN propagates. A
  ``NormalizedGram`` (scale-safe over any magnitude) is taken as it is.
  """
  if isinstance(gram, tree_math.NormalizedGram):
    return gram
  raw = jnp.asarray(gram)
  raw = raw.astype(jnp.promote_types(raw.dtype, jnp.float32))
  mean_sq = jnp.trace(raw) / raw.shape[0]
  zero = mean_sq == 0
  normalized = jnp.where(zero, jnp.zeros_like(raw),
                         raw / jnp.where(zero, 1.0, mean_sq))
  return tree_math.NormalizedGram(normalized, jnp.sqrt(mean_sq))


class PassThroughState(NamedTuple):
  """State of a pass-through rule for task-specific leaves (``mo.task_sum``).

  :func:`mtl_optax.task_weights` skips such states when a balancing method
  is present.

  Attributes:
    weights: ``(K,)`` the constant coefficients (ones).
  """
  weights: jax.Array


_LOSS_WEIGHTING_STATES: set = set()


def register_loss_weighting_state(cls: type) -> type:
  """Marks ``cls`` as the state of a :class:`LossWeightingTransformation`."""
  _LOSS_WEIGHTING_STATES.add(cls)
  return cls


def is_method_state(node: Any) -> bool:
  """Whether ``node`` is the state of one of the library's methods.

  Every method's state is a NamedTuple with a ``weights`` field, defined in
  this package (or registered as a loss-weighting state).
  """
  cls = type(node)
  fields = getattr(cls, "_fields", None)
  if not isinstance(node, tuple) or fields is None or "weights" not in fields:
    return False
  return (cls.__module__.startswith("mtl_optax")
          or cls in _LOSS_WEIGHTING_STATES)


def is_loss_weighting_state(node: Any) -> bool:
  return type(node) in _LOSS_WEIGHTING_STATES


def pure_tree(tree: Any) -> Any:
  """Flax NNX states hold variables (``nnx.Optimizer.opt_state``, the
  ``nnx.State`` of parameters): the same tree of plain arrays."""
  if "flax.nnx" not in sys.modules:
    return tree
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.as_pure(tree)


def _partition_label(path: Sequence[Any]) -> str:
  """The ``optax.partition`` labels on a state's path (``/``-joined), or the
  path itself when it crosses no partition."""
  labels = [str(path[i + 1].key) for i, key in enumerate(path[:-1])
            if isinstance(key, jax.tree_util.GetAttrKey)
            and key.name == "inner_states"
            and isinstance(path[i + 1], jax.tree_util.DictKey)]
  return "/".join(labels) if labels else jax.tree_util.keystr(path)


def method_states(opt_state: Any, select: Callable[[Any], bool]
                  ) -> list[tuple[str, Any]]:
  """``(label, state)`` of every method state in ``opt_state`` kept by
  ``select``; balancing states only, unless all are pass-through."""
  opt_state = pure_tree(opt_state)
  found = [(_partition_label(path), node) for path, node in
           jax.tree_util.tree_flatten_with_path(
               opt_state, is_leaf=is_method_state)[0]
           if is_method_state(node) and select(node)]
  balancing = [(k, s) for k, s in found
               if not isinstance(s, PassThroughState)]
  return balancing or found


def task_weights(opt_state: Any) -> jax.Array | dict:
  """The balancing method's task weights, wherever it is in ``opt_state``.

  Reads the ``weights`` field (the coefficients of the last update) of the
  library's method state inside any nesting of ``optax.chain``,
  ``optax.partition``, ``optax.inject_hyperparams``, ``optax.MultiSteps``,
  ``optax.apply_if_finite`` and a Flax ``nnx.Optimizer``'s ``opt_state``.
  Pass-through rules for task-specific leaves (``mo.task_sum``) are skipped
  when a balancing method is present; wrappers that hide their inner
  method's state (``mo.track_affinity``, ``mo.it_mtl``) count as one
  method.

  Args:
    opt_state: the whole optimizer state.

  Returns:
    The ``(K,)`` weights; with several balancing methods (one per
    ``optax.partition`` label), a dict ``label -> (K,)`` (labels of nested
    partitions are ``/``-joined; outside a partition the state's path).

  Raises:
    ValueError: no method state of this library in ``opt_state``.

  Example:
    >>> import jax.numpy as jnp, optax, mtl_optax as mo
    >>> params = {'trunk': jnp.ones(2), 'head': jnp.ones(2)}
    >>> tx = optax.chain(optax.partition(
    ...     {'shared': mo.mgda(2), 'head': mo.task_sum(2)},
    ...     mo.label_by_path({'trunk': 'shared', 'head': 'head'})),
    ...     optax.adam(1e-3))
    >>> grads = {'trunk': jnp.array([[1., 0.], [0., 3.]]),
    ...          'head': jnp.array([[1., 1.], [0., 0.]])}
    >>> _, opt_state = tx.update(grads, tx.init(params), params)
    >>> print(mo.task_weights(opt_state).round(2))
    [0.9 0.1]
  """
  found = method_states(opt_state, lambda node: True)
  if not found:
    raise ValueError(
        "task_weights: no mtl_optax method state in this optimizer state "
        f"(a {type(opt_state).__name__}); build the transformation with one "
        "of the library's methods, e.g. optax.chain(mo.cagrad(K), ...).")
  if len(found) == 1:
    return found[0][1].weights
  return {label: state.weights for label, state in found}


class Opaque:
  """A pytree node that hides the structure of the value it holds.

  It flattens to the value's leaves with the value's tree structure as static
  data, so ``jit``, ``tree.map`` and checkpointing see ordinary arrays while
  ``optax.tree.get`` (used by ``optax.inject_hyperparams`` and friends) cannot
  reach the NamedTuple fields of a wrapped method's state: a wrapper exposes
  only its own ``weights``.
  """

  def __init__(self, value):
    self.value = value

  def __repr__(self):
    return f"Opaque({self.value!r})"


def _is_container(x: Any) -> bool:
  return x is None or isinstance(x, (tuple, list, dict))


def _flatten_opaque(node: Opaque):
  # The static data is the skeleton of plain containers (NamedTuple states,
  # tuples, dicts) only; anything else is a child that JAX flattens on its
  # own. A wrapper that boxes the leaves in pytree nodes of its own (Flax
  # NNX's optimizer state variables) then sees the same static data before
  # and after boxing.
  children, skeleton = jax.tree.flatten(
      node.value, is_leaf=lambda x: not _is_container(x))
  return children, skeleton


jax.tree_util.register_pytree_node(
    Opaque, _flatten_opaque,
    lambda skeleton, children: Opaque(jax.tree.unflatten(skeleton, children)))


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def has_masked_nodes(tree: Any) -> bool:
  """Whether ``optax.partition``/``optax.masked`` replaced some leaves."""
  return any(_is_masked_node(x)
             for x in jax.tree.leaves(tree, is_leaf=_is_masked_node))


def masked_loss_fn(loss_fn: Callable[[Any], jax.Array],
                   params: Any) -> Callable[[Any], jax.Array]:
  """Lets a ``loss_fn`` of the full parameters be called inside a partition.

  ``optax.partition`` / ``optax.masked`` hand the inner method its leaves with
  ``optax.MaskedNode`` in place of the others. Look-ahead methods
  (``mo.marigold``, ``mo.it_mtl``, ``mo.track_affinity``) call ``loss_fn`` at
  displaced parameters; the returned function fills the masked leaves from
  ``params`` (the full current parameters) so that only the method's own
  partition moves.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import mtl_optax as mo
    >>> params = {'shared': jnp.array([1., 2.]), 'head': jnp.array([3.])}
    >>> fn = mo.masked_loss_fn(lambda p: p['shared'] * p['head'], params)
    >>> print(fn({'shared': jnp.array([0., 1.]), 'head': optax.MaskedNode()}))
    [0. 3.]
  """
  def wrapped(partial_params):
    if not has_masked_nodes(partial_params):
      return loss_fn(partial_params)
    # A MaskedNode may stand for a whole subtree (masks can be prefixes).
    full = jax.tree.map(lambda q, p: p if _is_masked_node(q) else q,
                        partial_params, params, is_leaf=_is_masked_node)
    return loss_fn(full)
  wrapped.accepts_masked_params = True
  return wrapped


def guard_loss_fn(loss_fn: Callable[[Any], jax.Array], params: Any,
                  method: str) -> Callable[[Any], jax.Array]:
  """A clear error when a full-tree ``loss_fn`` meets a masked partition."""
  if not has_masked_nodes(params) or getattr(loss_fn, "accepts_masked_params",
                                             False):
    return loss_fn

  def guarded(p):
    try:
      return loss_fn(p)
    except Exception as err:  # pylint: disable=broad-except
      raise ValueError(
          f"{method}: inside optax.partition/optax.masked, loss_fn is called "
          "with optax.MaskedNode in place of the other partitions' leaves. "
          "Wrap it: loss_fn=mo.masked_loss_fn(loss_fn, params) with the full "
          f"params. (Original error: {err!r})") from err
  return guarded
