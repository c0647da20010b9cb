"""Conformance cases of MARIGOLD (the stacked fallback path).

The suite passes stacked per-task gradients with a ``loss_fn`` consistent
with them; inside ``optax.partition`` that ``loss_fn`` takes the full tree, so
it is wrapped with :func:`mtl_optax.masked_loss_fn` (the documented
pattern).
"""

import mtl_optax as mo
from mtl_optax import masked_loss_fn
from tests.conftest import MethodCase


def _extras(params, task_losses, loss_fn):
  if loss_fn is not None:
    loss_fn = masked_loss_fn(loss_fn, params)
  return {"task_losses": task_losses, "loss_fn": loss_fn}


CASES = [
    MethodCase("marigold_mgda", mo.marigold,
               {"radius": 1e-2, "update_every": 1, "seed": 0}, extra_args=_extras),
    MethodCase("marigold_cagrad", mo.marigold,
               {"criterion": "cagrad", "c": 0.4, "rescale": 1,
                "radius": 1e-2, "update_every": 1, "seed": 0}, extra_args=_extras),
    MethodCase("marigold_jvp_cagrad", mo.marigold,
               {"criterion": "cagrad", "estimator": "jvp", "c": 0.4,
                "update_every": 1, "seed": 0}, extra_args=_extras),
    MethodCase("marigold_lookahead_central", mo.marigold,
               {"criterion": "lookahead", "lookahead_lr": 0.1,
                "difference": "central", "update_every": 2, "seed": 0},
               extra_args=_extras),
    # Randomised estimators skip the per-task descent check: its two
    # symmetric tasks sit on a knife edge (exact MGDA itself only just lowers
    # both), and any noise in the weights breaks the symmetry.
    MethodCase("marigold_random_directions_cagrad", mo.marigold,
               {"criterion": "cagrad", "estimator": "random_directions",
                "num_directions": 2, "decay": 0.5, "rescale": 1, "seed": 0,
                "update_every": 1}, deterministic=False,
               trains_every_task=False, jit_rtol=1e-2, extra_args=_extras),
    MethodCase("marigold_residual_feedback", mo.marigold,
               {"estimator": "random_directions", "residual_feedback": True,
                "learning_rate": 0.05, "seed": 0, "update_every": 1}, deterministic=False,
               trains_every_task=False, extra_args=_extras),
]
