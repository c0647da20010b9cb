"""Conformance cases of the foundation's methods."""

import mtl_optax as mo
from tests.conftest import MethodCase

CASES = [
    MethodCase("linear_scalarization", mo.linear_scalarization),
    MethodCase("task_sum", mo.task_sum),
    MethodCase("mgda", mo.mgda, {"max_iter": 500}),
    MethodCase("pcgrad", mo.pcgrad, {"seed": 3}, deterministic=False),
    MethodCase("cagrad", mo.cagrad, {"c": 0.4, "rescale": 1}),
    MethodCase("cagrad_c10_rescale0", mo.cagrad, {"c": 10.0, "rescale": 0}),
    MethodCase("cagrad_fast", mo.cagrad, {"c": 0.4, "num_sampled_tasks": 2},
               deterministic=False, min_tasks=3),
]
