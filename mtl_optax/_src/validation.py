"""Trace-time checks shared by every transformation.

All checks here read only static shapes and Python values, so they run once
when a function is traced and cost nothing inside a compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def check_num_tasks(num_tasks: Any, method: str) -> int:
  """Returns ``num_tasks`` as a Python int, or raises a clear error."""
  if isinstance(num_tasks, (jax.Array, jax.core.Tracer)):
    raise TypeError(
        f"{method}: num_tasks must be a static Python int, got a JAX array. "
        "With optax.inject_hyperparams pass static_args=('num_tasks', ...)."
    )
  if isinstance(num_tasks, (bool, np.bool_)) or not isinstance(
      num_tasks, (int, np.integer)):
    raise TypeError(f"{method}: num_tasks must be an int, got {num_tasks!r}.")
  num_tasks = int(num_tasks)
  if num_tasks < 1:
    raise ValueError(f"{method}: num_tasks must be >= 1, got {num_tasks}.")
  return num_tasks


def is_concrete(value: Any) -> bool:
  """True when ``value`` is known at trace time (not a tracer)."""
  return not isinstance(value, jax.core.Tracer)


def _concrete_array(value: Any) -> np.ndarray | None:
  """``value`` as a NumPy array when known at trace time, else None."""
  return np.asarray(value) if is_concrete(value) else None


def check_nonnegative(value: Any, name: str, method: str) -> None:
  """Raises for a concrete hyper-parameter that is negative or NaN; traced
  ones pass (``optax.inject_hyperparams``)."""
  array = _concrete_array(value)
  if array is not None and not np.all(array >= 0):
    raise ValueError(f"{method}: {name} must be >= 0, got {value!r}.")


def check_positive(value: Any, name: str, method: str) -> None:
  """Raises for a concrete hyper-parameter that is <= 0 or NaN; traced ones
  pass."""
  array = _concrete_array(value)
  if array is not None and not np.all(array > 0):
    raise ValueError(f"{method}: {name} must be > 0, got {value!r}.")


def check_finite(value: Any, name: str, method: str) -> None:
  """Raises for a concrete hyper-parameter with a NaN or infinite entry."""
  array = _concrete_array(value)
  if array is not None and not np.all(np.isfinite(array)):
    raise ValueError(f"{method}: {name} must be finite, got {value!r}.")


def check_probability(value: Any, name: str, method: str,
                      exclude_zero: bool = False,
                      exclude_one: bool = False) -> None:
  """Raises for a concrete hyper-parameter outside ``[0, 1]`` (or NaN).

  ``exclude_zero`` / ``exclude_one`` make that end of the interval open.
  """
  array = _concrete_array(value)
  if array is None:
    return
  above = array > 0 if exclude_zero else array >= 0
  below = array < 1 if exclude_one else array <= 1
  if not np.all(above & below):
    interval = ("(" if exclude_zero else "[") + "0, 1" + (
        ")" if exclude_one else "]")
    raise ValueError(f"{method}: {name} must be in {interval}, got {value!r}.")


def static_int(value: Any, name: str, method: str,
               minimum: int | None = None) -> int:
  """Returns ``value`` as a Python int, for arguments that fix shapes, loop
  lengths or PRNG seeds at construction.

  Raises:
    TypeError: for a JAX array or tracer (pass the name in ``static_args`` of
      ``optax.inject_hyperparams``), a bool or a non-integral number.
    ValueError: for an int below ``minimum``.
  """
  if isinstance(value, (jax.Array, jax.core.Tracer)):
    raise TypeError(
        f"{method}: {name} must be a static Python int, got a JAX array. With "
        f"optax.inject_hyperparams pass static_args=('num_tasks', '{name}').")
  if (isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0
      or not isinstance(value, (int, float, np.integer, np.floating))
      or int(value) != value):
    raise TypeError(f"{method}: {name} must be an int, got {value!r}.")
  if minimum is not None and int(value) < minimum:
    raise ValueError(f"{method}: {name} must be >= {minimum}, got {value}.")
  return int(value)


def check_task_axis(tree: Any, num_tasks: int, method: str,
                    what: str = "updates") -> None:
  """Checks that every leaf of ``tree`` carries a leading task axis of size K.

  Args:
    tree: stacked per-task gradients (leaves shaped ``(K, *param_shape)``).
    num_tasks: the K the transformation was built with.
    method: name used in the error message.
    what: what the tree is, for the error message.

  Raises:
    ValueError: naming the first offending leaf, its shape and the expected
      leading axis.
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = np.shape(leaf)
    if len(shape) == 0 or shape[0] != num_tasks:
      raise ValueError(
          f"{method}: leaf {jax.tree_util.keystr(path) or '<root>'} of {what} "
          f"has shape {tuple(shape)}, but a leading task axis of size "
          f"num_tasks={num_tasks} was expected, i.e. shape ({num_tasks}, ...). "
          "Stack per-task gradients with mo.value_and_task_grads, and give "
          "every method the same num_tasks as the number of task losses."
      )


def check_task_losses(task_losses: Any, num_tasks: int, method: str,
                      required: bool = False) -> None:
  """Checks the ``task_losses`` extra argument: shape ``(num_tasks,)``."""
  if task_losses is None:
    if required:
      raise ValueError(
          f"{method}: the extra argument task_losses (shape ({num_tasks},)) is "
          "required: call tx.update(grads, state, params, task_losses=losses)."
      )
    return
  shape = np.shape(task_losses)
  if shape != (num_tasks,):
    raise ValueError(
        f"{method}: task_losses has shape {tuple(shape)}, expected "
        f"({num_tasks},) (one loss per task, num_tasks={num_tasks})."
    )


def check_loss_fn(loss_fn: Any, method: str) -> None:
  """Checks that the ``loss_fn`` extra argument was given and is callable."""
  if loss_fn is None or not callable(loss_fn):
    raise ValueError(
        f"{method}: the extra argument loss_fn (a callable params -> (K,) task "
        "losses on the current batch) is required: call "
        "tx.update(grads, state, params, loss_fn=lambda p: task_losses(p, batch))."
    )


def check_seed(seed: Any, method: str) -> None:
  """Refuses a PRNG seed that is not an integer (e.g. 1.5 or True).

  A traced integer seed passes: ``optax.inject_hyperparams`` injects every
  numeric argument not named in ``static_args``.
  """
  if not is_concrete(seed) or isinstance(seed, jax.Array):
    if not jnp.issubdtype(jnp.result_type(seed), jnp.integer):
      raise TypeError(f"{method}: seed must be an int, got dtype "
                      f"{jnp.result_type(seed)}.")
    return
  static_int(seed, "seed", method)


def check_positive_int(value: Any, name: str, method: str) -> None:
  """Raises for a concrete value that is not an int >= 1.

  For iteration counts that only bound ``lax`` loops: a traced value (an int
  left out of ``static_args`` of ``optax.inject_hyperparams``) passes.
  Raises TypeError for a bool or a non-integral number, ValueError below 1.
  """
  if not is_concrete(value):
    return
  if (isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0
      or int(value) != value):
    raise TypeError(f"{method}: {name} must be an int >= 1, got {value!r}.")
  if int(value) < 1:
    raise ValueError(f"{method}: {name} must be an int >= 1, got {value!r}.")


def check_argnums(argnums: Any, what: str = "argnums") -> None:
  """Raises a clear TypeError unless ``argnums`` is an int or ints."""
  is_int = lambda a: isinstance(a, (int, np.integer)) and not isinstance(
      a, (bool, np.bool_))
  if is_int(argnums):
    return
  if isinstance(argnums, (tuple, list)) and argnums and all(
      is_int(a) for a in argnums):
    return
  raise TypeError(f"{what} must be an int or a non-empty tuple of ints (the "
                  f"positions of the arguments to differentiate), got "
                  f"{argnums!r} of type {type(argnums).__name__}.")


def as_loss_vector(out: Any, has_aux: bool, what: str) -> Any:
  """Stacks a Python list or tuple of K scalar losses into a ``(K,)`` array.

  ``out`` is a loss function's output (``(losses, aux)`` with ``has_aux``);
  arrays pass unchanged. An element that is not a scalar is refused with a
  message saying what to return.
  """
  losses, aux = out if has_aux else (out, None)
  if isinstance(losses, (list, tuple)):
    for i, loss in enumerate(losses):
      if np.ndim(loss) != 0:
        raise TypeError(
            f"{what}: fn returned a {type(losses).__name__} of "
            f"{len(losses)} items, and item {i} has shape "
            f"{tuple(np.shape(loss))}; return the K task losses as a 1-D "
            "array (or a list/tuple of K scalars, stacked for you). With an "
            "auxiliary output return (losses, aux) and pass has_aux=True.")
    losses = jax.numpy.stack(losses) if losses else losses
  return (losses, aux) if has_aux else losses


def task_batches(args: tuple, batch_argnum: Any, num_tasks: Any,
                 what: str) -> tuple:
  """Checks and normalises the per-task batches at ``args[batch_argnum]``.

  A Python list there is a list of K per-task batches (one per task, each
  with the same structure), stacked on a new leading axis; anything else
  must already carry the task axis on every leaf. Every leaf's leading axis
  must agree, and equal ``num_tasks`` when it is given.
  """
  check_argnums(batch_argnum, "batch_argnum")
  if not -len(args) <= batch_argnum < len(args):
    raise ValueError(f"{what}: batch_argnum={batch_argnum} is out of range "
                     f"for {len(args)} positional arguments.")
  batch = args[batch_argnum]
  if isinstance(batch, list):
    structures = {jax.tree.structure(b) for b in batch}
    if not batch or len(structures) != 1:
      raise ValueError(f"{what}: a list of per-task batches must hold K >= 1 "
                       "batches of one structure, got "
                       f"{len(batch)} with {len(structures)} structures.")
    batch = jax.tree.map(lambda *b: jax.numpy.stack(b), *batch)
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  sizes = {}
  for path, leaf in leaves:
    shape = tuple(np.shape(leaf))
    sizes.setdefault(shape[0] if shape else None, []).append(
        f"{jax.tree_util.keystr(path) or '<batch>'} {shape}")
  expected = {num_tasks} if num_tasks is not None else None
  if len(sizes) > 1 or None in sizes or (
      expected is not None and sizes and set(sizes) != expected):
    shapes = "; ".join(s for group in sizes.values() for s in group)
    raise ValueError(
        f"{what}: every leaf of the per-task batches needs a leading task "
        f"axis of one size K"
        f"{f' = num_tasks = {num_tasks}' if num_tasks is not None else ''}, "
        f"got shapes {shapes}. Stack one batch per task (or pass a Python "
        "list of per-task batches).")
  args = list(args)
  args[batch_argnum] = batch
  return tuple(args)


def check_float_leaves(tree: Any, method: str, what: str = "updates") -> None:
  """Refuses integer and boolean leaves, naming the leaf and its dtype.

  Gradients are floating point; an integer tree would be silently truncated
  by every weighted sum (the mean of 1 and 2 would be 1).
  """
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
          f"{method}: leaf {jax.tree_util.keystr(path) or '<root>'} of {what} "
          f"has dtype {dtype}; gradients must be floating point (cast them, "
          "e.g. with jax.tree.map(lambda g: g.astype(jnp.float32), grads)).")


def check_stacked_like_params(updates: Any, params: Any, num_tasks: int,
                              method: str) -> None:
  """With ``params`` given, checks every leaf of ``updates`` is shaped
  ``(K, *param.shape)``: catches unstacked gradients whose first axis
  happens to equal K, which :func:`check_task_axis` cannot tell apart."""
  if params is None:
    return
  u_leaves = jax.tree_util.tree_leaves_with_path(updates)
  p_leaves = jax.tree.leaves(params)
  if len(u_leaves) != len(p_leaves):
    raise ValueError(
        f"{method}: updates has {len(u_leaves)} leaves but params has "
        f"{len(p_leaves)}; pass the params tree the gradients were taken of.")
  for (path, leaf), param in zip(u_leaves, p_leaves):
    expected = (num_tasks,) + tuple(np.shape(param))
    if tuple(np.shape(leaf)) != expected:
      raise ValueError(
          f"{method}: leaf {jax.tree_util.keystr(path) or '<root>'} of updates "
          f"has shape {tuple(np.shape(leaf))} for a parameter of shape "
          f"{tuple(np.shape(param))}; stacked per-task gradients of shape "
          f"{expected} were expected. Stack them with mo.value_and_task_grads "
          "(an ordinary gradient whose first axis equals num_tasks is not "
          "stacked).")


def check_state_tasks(state: Any, num_tasks: int, method: str) -> None:
  """Checks a state's ``weights`` field against K (a state built for another
  number of tasks would otherwise fail with a broadcasting error)."""
  weights = getattr(state, "weights", None)
  if weights is not None and np.shape(weights) != (num_tasks,):
    raise ValueError(
        f"{method}: the state's weights have shape {tuple(np.shape(weights))}, "
        f"expected ({num_tasks},): the state was built for another number of "
        f"tasks; call tx.init with the transformation built for "
        f"num_tasks={num_tasks}.")
