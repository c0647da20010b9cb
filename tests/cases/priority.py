"""Conformance case: Priority-Constrained Descent (task 0 is the primary)."""

import mtl_optax as mo
from tests.conftest import MethodCase

CASES = [
    MethodCase("pcd", mo.pcd, {"tau": 0.2, "decay": 0.9, "eps": 1e-8},
               permutation_equivariant=False),
]
