"""Trace-time checks shared by every transformation.

All checks here read only static shapes and Python values, so they run once
when a function is traced and cost nothing inside a compiled step.
"""

from __future__ import annotations

from typing import Any

import jax
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


def check_nonnegative(value: Any, name: str, method: str) -> None:
  """Raises for a concrete negative hyper-parameter; traced ones pass."""
  if is_concrete(value) and np.any(np.asarray(value) < 0):
    raise ValueError(f"{method}: {name} must be >= 0, got {value!r}.")


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


def check_positive_int(value: Any, name: str, method: str) -> None:
  """Raises for a concrete value that is not an int >= 1.

  For iteration counts that only bound ``lax`` loops: a traced value (an int
  left out of ``static_args`` of ``optax.inject_hyperparams``) passes.
  """
  if not is_concrete(value):
    return
  if (isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0
      or int(value) != value or int(value) < 1):
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
