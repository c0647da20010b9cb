"""Conformance cases of LDC-MTL and Auto-Lambda.

Auto-Lambda's held-out ``loss_fn`` is the suite's ``loss_fn`` (consistent
with the stacked gradients), wrapped for ``optax.partition`` as for MARIGOLD.
"""

import mtl_optax as mo
from mtl_optax import masked_loss_fn
from tests.conftest import MethodCase


def _extras(params, task_losses, loss_fn):
  if loss_fn is not None:
    loss_fn = masked_loss_fn(loss_fn, params)
  return {"task_losses": task_losses, "loss_fn": loss_fn}


CASES = [
    # The discrepancy penalty runs over adjacent task pairs: positional.
    MethodCase("ldc_mtl", mo.ldc_mtl, {"penalty": 0.05, "learning_rate": 0.01},
               permutation_equivariant=False),
    MethodCase("auto_lambda", mo.auto_lambda,
               {"virtual_lr": 0.1, "meta_lr": 0.01, "weight_init": 0.1},
               extra_args=_extras),
]
