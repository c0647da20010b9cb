"""The one place that turns a weighting rule into an optax transformation.

Most methods in the library compute per-task coefficients ``c`` (from the
Gram matrix, their state, or the extra arguments) and return the update
``sum_i c_i g_i``. :func:`task_weighting_transformation` owns everything
around that rule: the trace-time checks, the single Gram pass, the weighted
sum and the optax plumbing, so each method's module contains only its math.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def all_finite(tree: Any) -> jax.Array:
  """One boolean: every element of every floating leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_transformation(
    num_tasks: int,
    method: str,
    init_fn: Callable[[Any], NamedTuple],
    step: Callable[[Any, NamedTuple, Any, dict],
                   tuple[Any, NamedTuple, jax.Array]],
    requires_task_losses: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """The optax plumbing every stacked-gradient method shares.

  Around ``step(updates, state, params, extra_args) -> (update, new_state,
  finite)`` it does the trace-time checks (leading task axis, floating-point
  leaves, leaf shapes ``(K, *param.shape)`` when ``params`` is given, the
  state's ``weights`` built for K tasks, ``task_losses`` shape), passes empty
  trees through, and keeps the previous state when
  ``finite`` is False: a NaN/inf step returns its non-finite update, for
  ``optax.apply_if_finite`` downstream to skip, but does not poison warm
  starts, EMAs or keys. State dtypes stay fixed across steps (jit carries,
  ``lax.cond``).
  """

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_task_axis(updates, num_tasks, method)
    validation.check_float_leaves(updates, method)
    validation.check_stacked_like_params(updates, params, num_tasks, method)
    validation.check_state_tasks(state, num_tasks, method)
    validation.check_task_losses(extra_args.get("task_losses"), num_tasks,
                                 method, required=requires_task_losses)
    if not jax.tree.leaves(updates):
      return updates, state
    update, new_state, finite = step(updates, state, params, extra_args)
    new_state = jax.tree.map(
        lambda new, old: jnp.where(finite, jnp.asarray(new).astype(old.dtype),
                                   old), new_state, state)
    return update, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def finite_if_weights_and_update_are(step):
  """Adapts ``step -> (update, new_state)`` for :func:`guarded_transformation`.

  The step counts as finite when the new ``weights`` and the update are: for
  methods that compute the update themselves rather than from a Gram matrix.
  """
  def checked(updates, state, params, extra_args):
    update, new_state = step(updates, state, params, extra_args)
    return update, new_state, all_finite(new_state.weights) & all_finite(update)
  return checked


def task_weighting_transformation(
    num_tasks: int,
    method: str,
    init_state: Callable[[jnp.dtype], NamedTuple],
    weights_rule: Callable[[WeightingContext, NamedTuple],
                           tuple[jax.Array, NamedTuple]],
    needs_gram: bool = True,
    requires_task_losses: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Builds a transformation ``stacked grads -> sum_i c_i g_i``.

  Args:
    num_tasks: K, already validated.
    method: the method's public name, used in error messages.
    init_state: ``dtype -> State``; the state must have a ``weights`` field.
    weights_rule: ``(context, state) -> (coefficients (K,), new_state)``;
      the coefficients may be a :class:`ScaledCoefficients`.
    needs_gram: whether the rule reads the Gram matrix (one pass over the
      gradients); rules that do not (fixed weights) skip it.
    requires_task_losses: raise at trace time if ``task_losses`` is missing.

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
    if needs_gram:
      normalized = tree_math.normalized_gram(updates)
      gram = normalized.gram.astype(jnp.promote_types(dtype, jnp.float32))
      rms_norm = normalized.rms_norm
    else:
      gram = rms_norm = None
    context = WeightingContext(gram, rms_norm, extra_args.get("task_losses"),
                               extra_args, dtype)
    coefficients, new_state = weights_rule(context, state)
    scale = None
    if isinstance(coefficients, ScaledCoefficients):
      coefficients, scale = coefficients
    finite = jnp.all(jnp.isfinite(coefficients))
    if gram is not None:
      finite &= jnp.all(jnp.isfinite(gram))
    update = tree_math.weighted_task_sum(coefficients, updates)
    if scale is not None:
      finite &= jnp.isfinite(scale)
      update = jax.tree.map(
          lambda u: (u.astype(jnp.promote_types(u.dtype, scale.dtype))
                     * scale).astype(u.dtype), update)
    return update, new_state, finite

  return guarded_transformation(num_tasks, method, init_fn, step,
                                requires_task_losses)


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

  Besides ``init`` and ``update`` it has a ``loss_weights`` attribute,
  ``(method_state, task_losses) -> (K,)``: the coefficients ``c`` of the next
  weighted loss ``sum_i c_i L_i``, whose gradient (one backward pass,
  :func:`mtl_optax.value_and_weighted_grad`) is what ``update`` receives. The
  coefficients are treated as constants (``stop_gradient``).

  ``update(grads, state, params, task_losses=..., loss_fn=...)`` receives that
  ordinary (unstacked) gradient, returns the update (usually the gradient
  itself) and advances the weights from the extra arguments. Methods that
  also accept stacked per-task gradients combine them with the same
  coefficients (``sum_i c_i g_i``), so both paths give the same update.
  """


def loss_weighting_transformation(init_fn, update_fn, loss_weights
                                  ) -> LossWeightingTransformation:
  """Builds a :class:`LossWeightingTransformation`."""
  tx = LossWeightingTransformation(init_fn, update_fn)
  tx.loss_weights = loss_weights
  return tx


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


jax.tree_util.register_pytree_node(
    Opaque,
    lambda node: (jax.tree.leaves(node.value), jax.tree.structure(node.value)),
    lambda treedef, leaves: Opaque(jax.tree.unflatten(treedef, leaves)))


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
