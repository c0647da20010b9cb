"""Shared fixtures and the method registry of the conformance suite."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@dataclasses.dataclass(frozen=True)
class MethodCase:
  """One public method, as the conformance suite builds and calls it.

  Attributes:
    name: test id.
    factory: the public factory; called as ``factory(num_tasks, **kwargs)``.
    kwargs: other arguments. Python ints among them are passed as
      ``static_args`` to ``optax.inject_hyperparams``, floats are injected.
    deterministic: False for randomised methods (they skip the permutation
      test, which needs the same randomness after permuting the tasks).
    permutation_equivariant: whether permuting tasks permutes the weights
      (False for methods with a positional preference, e.g. fixed weights).
    extra_args: builds the extra keyword arguments of ``update`` from
      ``(params, task_losses, loss_fn)``; by default both
      ``{'task_losses': ..., 'loss_fn': ...}`` are passed, since every method
      must accept (and may ignore) them.
    min_tasks: smallest K the method accepts.
    trains_every_task: whether a short run on the conflicting quadratic
      problem is expected to lower every task's loss.
    jit_rtol: relative tolerance of jit against eager execution. Finite
      differences of losses divide rounding noise by a small radius, so
      zeroth-order estimators are looser than the default.
  """
  name: str
  factory: Callable[..., Any]
  kwargs: dict = dataclasses.field(default_factory=dict)
  deterministic: bool = True
  permutation_equivariant: bool = True
  extra_args: Callable[[Any, Any, Any], dict] | None = None
  min_tasks: int = 1
  trains_every_task: bool = True
  jit_rtol: float = 1e-4

  def make(self, num_tasks: int):
    return self.factory(num_tasks, **self.kwargs)

  def static_args(self) -> tuple[str, ...]:
    ints = [k for k, v in self.kwargs.items()
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool)]
    return ("num_tasks", *ints)

  def extras(self, params, task_losses, loss_fn=None) -> dict:
    if self.extra_args is None:
      return {"task_losses": task_losses, "loss_fn": loss_fn}
    return self.extra_args(params, task_losses, loss_fn)

  def __str__(self):
    return self.name


def all_cases() -> list[MethodCase]:
  import tests.cases as cases_pkg
  out = []
  for info in sorted(pkgutil.iter_modules(cases_pkg.__path__),
                     key=lambda i: i.name):
    module = importlib.import_module(f"tests.cases.{info.name}")
    out.extend(module.CASES)
  names = [c.name for c in out]
  duplicates = {n for n in names if names.count(n) > 1}
  assert not duplicates, f"duplicate conformance case names: {duplicates}"
  return out


def stacked_tree(key, num_tasks: int, dtype=jnp.float32):
  """A small parameter tree's worth of stacked task gradients (two leaves)."""
  k1, k2 = jax.random.split(key)
  return {
      "dense": {"kernel": jax.random.normal(k1, (num_tasks, 4, 3), dtype),
                "bias": jax.random.normal(k2, (num_tasks, 3), dtype)},
  }


#: TorchJD's test matrix: two conflicting task gradients.
TORCHJD_J = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


def apply_fresh(tx, grads, state=None):
  """``tx.update`` on stacked ``grads`` (one array), from ``tx.init`` unless
  a ``state`` is given; the parameters are zeros of one task's shape."""
  grads = jnp.asarray(grads)
  if state is None:
    state = tx.init(jnp.zeros(grads.shape[1:], grads.dtype))
  return tx.update(grads, state)


def params_like(stacked):
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), stacked)


def linear_loss_fn(stacked, params, task_losses):
  """``p -> task_losses + J (p - params)``: losses whose gradients at any point
  are exactly the stacked gradients, so look-ahead methods see data that is
  consistent with ``updates``."""
  def loss_fn(p):
    moves = jax.tree.map(
        lambda g, new, old: jnp.tensordot(
            g.reshape(g.shape[0], -1).astype(jnp.float32),
            (new - old).reshape(-1).astype(jnp.float32), axes=1),
        stacked, p, params)
    return task_losses + sum(jax.tree.leaves(moves))
  return loss_fn


#: XLA's own defaults, which a user's ``jax.jit`` compiles with (the root
#: conftest.py trades them for compile time in the whole suite).
DEFAULT_XLA_OPTIONS = {"xla_backend_optimization_level": 3,
                       "xla_llvm_disable_expensive_passes": False,
                       "xla_cpu_use_fusion_emitters": True}


def jit_as_users_compile(fn: Callable, *args):
  """``jax.jit(fn)`` compiled for ``args`` with XLA's default options.

  Those contract ``a * b - c * d`` into fused multiply-adds (on CPU and
  GPU), so rounding can take a sign that the suite's fast compiles never
  show; tests that compare with an official sequence at a point where an
  exact tie decides a step run through this.
  """
  return jax.jit(fn).lower(*args).compile(
      compiler_options=DEFAULT_XLA_OPTIONS)


@pytest.fixture
def rng():
  return np.random.default_rng(0)
