"""Conformance cases: dual cone, closed forms, bargaining.

UPGrad without its ridge and FairGrad with alpha != 1 are covered on the
degenerate inputs by tests/test_dual_cone.py and tests/test_bargaining.py,
which keeps this suite's cost (about 20 s of CPU per case) down.
"""

import mtl_optax as mo
from tests.conftest import MethodCase

CASES = [
    MethodCase("upgrad", mo.upgrad, {"reg_eps": 1e-4, "max_iter": 100}),
    MethodCase("dualproj", mo.dualproj, {"reg_eps": 1e-4, "max_iter": 100}),
    MethodCase("imtl_g", mo.imtl_g),
    MethodCase("aligned_mtl", mo.aligned_mtl),
    MethodCase("config", mo.config),
    MethodCase("nash_mtl", mo.nash_mtl,
               {"update_every": 1, "max_iter": 20,
                "max_norm": 1.0}),
    MethodCase("nash_mtl_every2_unclipped", mo.nash_mtl,
               {"update_every": 2, "max_iter": 20,
                "max_norm": 0.0}),
    MethodCase("fairgrad", mo.fairgrad, {"alpha": 1.0, "max_iter": 50}),
]
