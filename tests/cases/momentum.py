"""Conformance cases of M-ConFIG and PSMGD (given stacked gradients)."""

import mtl_optax as mo
from tests.conftest import MethodCase

CASES = [
    # One task's gradient per step, round robin: a positional schedule.
    MethodCase("momentum_config", mo.momentum_config,
               {"beta_1": 0.9, "beta_2": 0.999}, permutation_equivariant=False),
    MethodCase("momentum_config_direction", mo.momentum_config,
               {"beta_1": 0.5, "normalize": False},
               permutation_equivariant=False),
    MethodCase("psmgd", mo.psmgd, {"update_every": 3}),
]
