"""TorchJD's published values on its test matrix, one row per method.

TorchJD's aggregator tests use J = [[-4, 1, 1], [6, 1, 1]] (two conflicting
task gradients) and list each aggregator's output to 4 decimals. Every row
below states the factory, its keyword arguments, TorchJD's update (and its
weights where TorchJD publishes them) and the documented scale factor
between TorchJD and this library: TorchJD's PCGrad, GradVac and ConFIG sum
the corrected gradients where this library averages them (the mean-gradient
scale, ``optax.scale(num_tasks)`` away), so TorchJD's value is ``scale``
times ours. Each row runs the optax factory on the stacked gradients and,
where the method has one, the function of ``mtl_optax.gram_weightings`` on
``J J^T`` (``weights @ J``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax import gram_weightings as gw
from tests.conftest import TORCHJD_J, apply_fresh


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  factory: Callable
  update: Sequence[float]
  kwargs: dict = dataclasses.field(default_factory=dict)
  weights: Optional[Sequence[float]] = None
  weights_field: str = "weights"  # the state field TorchJD's weights match
  gram_fn: Optional[Callable] = None
  scale: float = 1.0  # TorchJD's value = scale * ours
  atol: float = 1e-4

  def __str__(self):
    return self.name


ROWS = [
    Row("mean", mo.linear_scalarization, [1.0, 1.0, 1.0],
        weights=[0.5, 0.5], atol=1e-6),
    Row("constant", mo.linear_scalarization, [8.0, 3.0, 3.0],
        kwargs={"weights": [1.0, 2.0]}, weights=[1.0, 2.0], atol=1e-6),
    Row("sum", mo.task_sum, [2.0, 2.0, 2.0], weights=[1.0, 1.0], atol=1e-6),
    Row("mgda", mo.mgda, [0.0, 1.0, 1.0], weights=[0.6, 0.4],
        gram_fn=gw.mgda),
    Row("pcgrad", mo.pcgrad, [0.5848, 3.8012, 3.8012],
        weights=[2.2222, 1.5789], gram_fn=gw.pcgrad, scale=2.0),
    Row("gradvac", mo.gradvac, [0.5848, 3.8012, 3.8012],
        kwargs={"decay": 0.5}, weights=[2.2222, 1.5789], gram_fn=gw.gradvac,
        scale=2.0),
    Row("upgrad", mo.upgrad, [0.2929, 1.9004, 1.9004],
        weights=[1.1109, 0.7894], gram_fn=gw.upgrad),
    Row("dualproj", mo.dualproj, [0.5563, 1.1109, 1.1109],
        weights=[0.6109, 0.5], gram_fn=gw.dualproj),
    Row("imtl_g", mo.imtl_g, [0.0767, 1.0, 1.0], weights=[0.5923, 0.4077],
        gram_fn=gw.imtl_g),
    Row("aligned_mtl", mo.aligned_mtl, [0.2133, 0.9673, 0.9673],
        weights=[0.5591, 0.4083], gram_fn=gw.aligned_mtl),
    Row("config", mo.config, [0.1588, 2.0706, 2.0706], gram_fn=gw.config,
        scale=2.0),
    Row("fairgrad", mo.fairgrad, [0.0766, 0.9985, 0.9985],
        kwargs={"alpha": 1.0}, weights=[0.5915, 0.4071], gram_fn=gw.fairgrad),
    # NashMTL's default max_norm=1 rescales the solution alpha to unit norm;
    # TorchJD's weights are alpha.
    Row("nash_mtl", mo.nash_mtl, [0.0542, 0.7061, 0.7061],
        weights=[0.5915, 0.4071], weights_field="alpha", gram_fn=gw.nash_mtl),
    Row("pcd", mo.pcd, [-0.8200, 2.9434, 2.9434], weights=[1.8481, 1.0954],
        gram_fn=gw.pcd),
]


@pytest.mark.parametrize("row", ROWS, ids=str)
def test_factory_reproduces_torchjd(row):
  update, state = apply_fresh(row.factory(2, **row.kwargs), TORCHJD_J)
  np.testing.assert_allclose(row.scale * np.asarray(update), row.update,
                             atol=row.atol)
  if row.weights is not None:
    np.testing.assert_allclose(
        row.scale * np.asarray(getattr(state, row.weights_field)),
        row.weights, atol=row.atol)


@pytest.mark.parametrize("row", [r for r in ROWS if r.gram_fn], ids=str)
def test_gram_weighting_reproduces_torchjd(row):
  jac = jnp.asarray(TORCHJD_J, jnp.float32)
  out = row.gram_fn(jac @ jac.T, **row.kwargs)
  np.testing.assert_allclose(row.scale * np.asarray(out.weights @ jac),
                             row.update, atol=2 * row.atol)
