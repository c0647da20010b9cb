"""Settings for the whole test session (tests/ and the doctests of mtl_optax/).

The suite is compile-bound: the conformance suite alone jit-compiles well over
a thousand small programs, each run once or twice. XLA:CPU's optimisation
passes are traded for compile time here (about half the suite's wall time);
the benchmarks, which time compiled code, never run under pytest. JAX reads
``XLA_FLAGS`` when its backend starts, after this file is imported.
"""

import os

_FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true")

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()


import pytest  # noqa: E402

# Long end-to-end runs outside the modules that mark their own matrices slow
# (tests/test_conformance.py, test_notebooks.py, test_sharding.py): each took
# 15-55 s in a loaded run of the whole suite. Rule for the default run: a
# case that takes more than about 10 s on an idle 2-core machine, or that
# repeats a check across a matrix, goes under `slow` (which .ci/run runs),
# keeping a cheap representative in the default run.
_SLOW_TESTS = (
    "tests/test_toy.py::test_cagrad_reaches_the_average_loss_optimum_from_every_start",
    "tests/test_toy.py::test_mean_gradient_is_stuck_from_three_starts",
    "tests/test_toy.py::test_mgda_and_pcgrad_end_on_the_pareto_set",
    "tests/test_toy.py::test_command_line_main_job_writes_plot_and_table",
    "tests/test_toy.py::test_run_toy_takes_loss_weightings_and_shifted_losses",
    "tests/test_transference.py::test_it_mtl_picks_the_best_lookahead",
    "mtl_optax/_src/flax_utils.py::mtl_optax._src.flax_utils.apply_task_gradients",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  for item in items:
    if item.nodeid.split("[")[0] in _SLOW_TESTS:
      item.add_marker(pytest.mark.slow)
