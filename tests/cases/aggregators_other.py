"""Conformance cases: surgery, stochastic, robust and fixed or random weightings."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

import mtl_optax as mo
from tests.conftest import MethodCase


@dataclasses.dataclass(frozen=True)
class WrapperCase(MethodCase):
  """A wrapper ``factory(num_tasks, inner, ...)``: the inner method is rebuilt
  for every K (``kwargs['inner']`` is the K = 3 instance that
  ``optax.inject_hyperparams`` receives as a non-numeric argument)."""
  inner_factory: Callable = None

  def make(self, num_tasks: int):
    kwargs = dict(self.kwargs, inner=self.inner_factory(num_tasks))
    return self.factory(num_tasks=num_tasks, **kwargs)


def _with_second_batch(params, task_losses, loss_fn):
  """Both default extras plus ``second_task_grads``: the Jacobian of the
  consistent linear ``loss_fn`` (the same gradients, so results match the
  single-batch call while the two-batch path is exercised)."""
  extras = {"task_losses": task_losses, "loss_fn": loss_fn}
  if loss_fn is not None:
    extras["second_task_grads"] = jax.jacrev(loss_fn)(params)
  return extras


CASES = [
    MethodCase("gradvac", mo.gradvac, {"decay": 0.5, "seed": 2},
               deterministic=False),
    # Random sign choices promise no per-task descent on a given run.
    MethodCase("graddrop", mo.graddrop, {"seed": 1, "leak": 0.0},
               deterministic=False, trains_every_task=False),
    MethodCase("graddrop_leak", mo.graddrop,
               {"seed": 1, "leak": jnp.array([0.2, 0.5, 0.9])},
               deterministic=False, permutation_equivariant=False,
               min_tasks=3, trains_every_task=False),
    MethodCase("excess_mtl", mo.excess_mtl,
               {"robust_step_size": 0.5, "warmup_steps": 1}),
    # With LibMTL's inner step (learning_rate=5) the 20 projected steps jump between
    # vertices of the simplex and one task's loss rises on the test problem;
    # a smaller inner step converges and then trains every task.
    MethodCase("sdmgrad", mo.sdmgrad, {"lam": 0.3, "learning_rate": 0.5,
                                       "max_iter": 20}),
    MethodCase("sdmgrad_two_batches", mo.sdmgrad, {"lam": 0.3, "learning_rate": 5.0},
               extra_args=_with_second_batch, trains_every_task=False),
    MethodCase("modo", mo.modo, {"learning_rate": 0.1, "rho": 0.1}),
    MethodCase("modo_two_batches", mo.modo, {"learning_rate": 0.1, "rho": 0.1},
               extra_args=_with_second_batch),
    # MoCo weights loss-scaled unit directions with near-uniform (softmax)
    # weights: the task with the largest loss dominates, and on the test
    # problem another task's loss rises slightly.
    MethodCase("moco", mo.moco, {"decay": 0.5, "learning_rate": 0.1,
                                 "rho": 0.0},
               trains_every_task=False),
    MethodCase("random_weighting", mo.random_weighting, {"seed": 4},
               deterministic=False),
    # A tuple is not injected: injected ``weights`` would put a second
    # ``weights`` entry (the hyper-parameter) in the state, which
    # optax.tree.get then refuses (tests/test_weightings.py covers it).
    MethodCase("linear_scalarization_weights", mo.linear_scalarization,
               {"weights": (0.2, 0.3, 0.5)},
               permutation_equivariant=False, min_tasks=3,
               trains_every_task=False),
    MethodCase("krum", mo.krum, {"n_byzantine": 0, "n_selected": 2},
               min_tasks=3),
    MethodCase("trimmed_mean", mo.trimmed_mean, {"trim_number": 1},
               min_tasks=3),
    WrapperCase("ema_weights_mgda", mo.ema_weights,
                {"inner": mo.mgda(3), "decay": 0.7},
                inner_factory=mo.mgda),
]


def adversarial_jacobians(seed: int = 0, width: int = 10) -> dict:
  """Flattened float64 Jacobians (K, width) shared by the issue-3B value
  tests: random, near-colinear, rank-deficient, one zero task, K=1, K=64."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(1, width))
  basis = rng.normal(size=(2, width))
  return {
      "random": rng.normal(size=(3, width)),
      "near_colinear": base + 1e-4 * rng.normal(size=(3, width)),
      "rank_deficient": rng.normal(size=(3, 2)) @ basis,
      "one_zero": rng.normal(size=(3, width)) * np.array([[1.0], [0.0], [1.0]]),
      "k1": rng.normal(size=(1, width)),
      "k64": rng.normal(size=(64, width)) + 0.5 * base,
  }
