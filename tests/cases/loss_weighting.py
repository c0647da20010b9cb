"""Conformance cases of the loss weightings.

The suite calls every method on stacked per-task gradients (the stacked
fallback) with ``task_losses`` and ``loss_fn``; the single-backward path is
checked against it in ``tests/test_loss_weighting.py``.
"""

import mtl_optax as mo
from tests.conftest import MethodCase

CASES = [
    MethodCase("uncertainty_weighting", mo.uncertainty_weighting,
               {"learning_rate": 0.025}),
    MethodCase("imtl_l", mo.imtl_l, {"learning_rate": 0.025}),
    MethodCase("dwa", mo.dwa, {"temperature": 2.0, "update_every": 1}),
    MethodCase("dwa_period3", mo.dwa, {"temperature": 2.0, "update_every": 3}),
    MethodCase("gradnorm", mo.gradnorm, {"alpha": 1.5, "learning_rate": 0.025}),
    MethodCase("famo", mo.famo, {"learning_rate": 0.025, "weight_decay": 1e-3}),
    MethodCase("db_mtl", mo.db_mtl, {"decay": 0.9, "beta_sigma": 0.5}),
    MethodCase("stch", mo.stch, {"mu": 1.0, "warmup_steps": 0,
                                 "nadir_steps": 1}),
    MethodCase("stch_warmup", mo.stch, {"mu": 0.5, "warmup_steps": 2,
                                        "nadir_steps": 3}),
    MethodCase("gls", mo.gls),
    MethodCase("scale_invariant", mo.scale_invariant),
    MethodCase("random_loss_weighting", mo.random_loss_weighting, {"seed": 1},
               deterministic=False),
]
