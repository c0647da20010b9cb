"""Conformance cases: track_affinity (wrapping an aggregator) and
IT-MTL.

Both read the ``loss_fn`` extra argument; the suite's ``linear_loss_fn`` is
consistent with the gradients. Inside ``optax.partition`` that ``loss_fn``
takes the full tree, so it is wrapped with
:func:`mtl_optax.masked_loss_fn` (the documented pattern).
``track_affinity`` alone passes the stacked gradients through, so the suite
runs it wrapping an aggregator (``inner=``), rebuilt for every K.
"""

from __future__ import annotations

import dataclasses

import mtl_optax as mo
from mtl_optax import masked_loss_fn
from tests.cases.aggregators_other import WrapperCase
from tests.conftest import MethodCase


def _extras(params, task_losses, loss_fn):
  if loss_fn is not None:
    loss_fn = masked_loss_fn(loss_fn, params)
  return {"task_losses": task_losses, "loss_fn": loss_fn}


@dataclasses.dataclass(frozen=True)
class CandidatesCase(MethodCase):
  """``it_mtl`` with explicit candidates, rebuilt for every K
  (``kwargs['candidates']`` is the K = 3 tuple that
  ``optax.inject_hyperparams`` receives as a non-numeric argument)."""
  candidate_factories: tuple = ()

  def make(self, num_tasks: int):
    kwargs = dict(self.kwargs, candidates=tuple(
        f(num_tasks) for f in self.candidate_factories))
    return self.factory(num_tasks, **kwargs)


CASES = [
    WrapperCase("track_affinity_mean", mo.track_affinity,
                {"lr": 0.1, "update_every": 2, "inner": mo.linear_scalarization(3)},
                inner_factory=mo.linear_scalarization, extra_args=_extras),
    # The default candidates include PCGrad, which is randomised.
    MethodCase("it_mtl", mo.it_mtl, {"lookahead_lr": 0.1, "seed": 1},
               deterministic=False, extra_args=_extras),
    CandidatesCase("it_mtl_loss_mean_mgda", mo.it_mtl,
                   {"lookahead_lr": 0.1, "criterion": "loss",
                    "candidates": (mo.linear_scalarization(3), mo.mgda(3))},
                   candidate_factories=(mo.linear_scalarization, mo.mgda),
                   extra_args=_extras),
]
