"""Conformance cases of the preference scalarisations (COSMOS, PBI)."""

import mtl_optax as mo
from tests.conftest import MethodCase

CASES = [
    MethodCase("cosmos", mo.cosmos, {"lambda_": 1.0}),
    MethodCase("pbi", mo.pbi, {"theta": 5.0}),
]
