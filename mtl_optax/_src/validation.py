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
