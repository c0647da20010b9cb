"""Eager calls of the library's pure kernels, each as one compiled program.

Called outside ``jax.jit``, JAX runs a function op by op: every primitive
is compiled and dispatched on its own, and a solver of a few hundred
primitives then costs seconds on its first call and a large fraction of a
second on every later one. :func:`compiled_when_eager` runs such a call as
one jitted program instead, shared by every caller with the same static
configuration and argument shapes; inside a trace (``jit``, ``vmap``,
``grad``) the function runs as written, so a compiled training step is
exactly what it would be without it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

import jax
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])


def _is_array(leaf: Any) -> bool:
  return isinstance(leaf, (jax.Array, np.ndarray, np.generic))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _compiled_call(fn, treedef, static_leaves, *arrays):
  arrays = iter(arrays)
  leaves = [next(arrays) if is_array else value
            for is_array, _, value in static_leaves]
  args, kwargs = jax.tree.unflatten(treedef, leaves)
  return fn(*args, **kwargs)


def compiled_when_eager(fn: F) -> F:
  """``fn`` jitted over its array arguments when called outside a trace.

  Every other argument (Python numbers, bools, strings, None, functions)
  is static: hashed into the compilation cache, as ``jax.jit``'s
  ``static_argnames`` would be. ``fn`` must be a pure function whose Python
  control flow reads only those static arguments and the arrays' shapes
  and dtypes, i.e. one that already works under ``jax.jit``; its
  trace-time errors are raised unchanged. A call with a tracer among its
  arguments, or with an unhashable non-array argument, runs ``fn`` directly.
  """

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    leaves, treedef = jax.tree.flatten((args, kwargs))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
      return fn(*args, **kwargs)
    arrays = [leaf for leaf in leaves if _is_array(leaf)]
    # The type too: 1, 1.0 and True are equal keys for a dict, not for fn.
    static_leaves = tuple(
        (True, None, None) if _is_array(leaf) else (False, type(leaf), leaf)
        for leaf in leaves)
    try:
      hash(static_leaves)
    except TypeError:
      return fn(*args, **kwargs)
    return _compiled_call(fn, treedef, static_leaves, *arrays)

  return wrapper  # type: ignore[return-value]
