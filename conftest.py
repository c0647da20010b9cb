"""Settings for the whole test session (tests/ and the doctests of mtl_optax/).

The suite is compile-bound: the conformance suite alone jit-compiles well over
a thousand small programs, each run once or twice. XLA:CPU's optimisation
passes are traded for compile time here (about half the suite's wall time),
and so are its MLIR fusion emitters, which XLA uses by default on CPU and which
took about half of what was left (the default run: 298 -> 154 s on an idle
2-core machine); the benchmarks, which time compiled code, never run under
pytest. Tests whose outcome depends on what the default options emit (a fused
multiply-add where an exact tie decides a step) compile through
``tests.conftest.jit_as_users_compile``. JAX reads ``XLA_FLAGS`` when its
backend starts, after this file is imported.
"""

import os
import tempfile

_FAST_COMPILE = ("--xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()

# Many programs recur verbatim across tests (each method's step is compiled
# by several checks of the contract, and the slow tier repeats the default
# run's cases), so both pytest workers share a persistent compilation cache
# keyed by the program, the flags and the JAX version: a repeat is loaded,
# not compiled again (the conformance suite: 112 -> 85 s from a cold cache).
# No size bound: bounding it makes JAX rescan the whole directory at every
# write (the default run took twice as long). An entry read while the other
# worker writes it fails with a warning and is compiled instead. The cache
# outlives the run (a re-run loads what did not change; a fresh set of the
# default run's programs is about 30 MB): delete the directory to reclaim
# it, or set JAX_COMPILATION_CACHE_DIR to use another one.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "mtl-optax-test-xla-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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
    # 5-18 s each on a 2-core CPU (measured with --durations):
    "tests/test_cagrad.py::test_dual_value_equals_worst_improvement",
    "tests/test_stochastic.py::test_sdmgrad_default_is_the_same_under_jit_eager_and_vmap",
    "tests/test_gram_first.py::test_gram_first_eager_and_plain_chain",
    "tests/test_marigold.py::test_jvp_estimator_in_float32_and_for_the_lookahead_criterion",
    "tests/test_marigold.py::test_frozen_weights_converge_to_exact_mgda_and_cagrad_weights",
    "tests/test_marigold.py::test_old_argument_and_state_field_names_warn_and_still_work",
    "tests/test_marigold.py::test_random_directions_exact_for_mgda_and_tightens_with_q_for_cagrad",
    "tests/test_flax_utils.py::test_linen_training_lowers_every_task",
    "tests/test_aggregators.py::test_mgda_output_is_min_norm_and_common_descent",
    "tests/test_momentum.py::test_psmgd_reuses_mgda_weights_between_solves",
    "tests/test_flax_utils.py::test_nnx_chunked_task_grads_and_train_step_equal_vmap",
    "tests/test_marigold.py::test_jvp_estimator_converges_to_the_exact_weights_without_bias",
    "tests/test_marigold.py::test_lookahead_criterion_converges_to_its_exact_minimiser",
    "tests/test_cagrad.py::test_cagrad_fast_solves_the_papers_surrogate_problem",
    "tests/test_bargaining.py::test_degenerate_inputs_are_reported_not_averaged",
    "tests/test_stochastic.py::test_old_spellings_warn_and_convert",
    "tests/test_flax_utils.py::test_nnx_weighted_grad_is_weighted_sum_of_task_grads",
)


# Tests parametrised over every method (or a matrix of inputs): the default
# run keeps the representative methods of tests/test_conformance.py and the
# first parameter set; the rest runs under `slow`.
_PER_METHOD_MATRICES = (
    "tests/test_properties.py",
    "tests/test_gram_weightings.py",
    "tests/test_gram_first.py::test_gram_first_matches_stacked_path",
    "tests/test_naming.py::test_every_public_method_prints_its_factory_name",
    "tests/test_flax_utils.py::test_every_method_inside_nnx_optimizer",
    "tests/test_two_task.py",
    "tests/test_priority.py",
    "tests/test_scalarization.py",
    "tests/test_solvers.py",
    "tests/test_robust.py",
    "tests/test_marigold.py",
    "tests/test_stochastic.py",
    "tests/test_momentum.py",
    "tests/test_loss_weighting.py",
    "tests/test_closed_form.py",
    "tests/test_dual_cone.py",
    "tests/test_bargaining.py",
    "tests/test_surgery.py",
    "tests/test_validation.py",
    "tests/test_flax_utils.py",
    "tests/test_transference.py",
    "tests/test_grads.py",
    "tests/test_torchjd_values.py",
)
_REPRESENTATIVE = ("mgda", "upgrad", "famo")


def _in_matrix(nodeid: str) -> bool:
  path, _, name = nodeid.split("[")[0].partition("::")
  return any(entry in (path, f"{path}::{name}")
             for entry in _PER_METHOD_MATRICES)


# The longest test of the default run (about 15 s, one interpreter over every
# README block) runs first: a test that starts last keeps one worker busy
# while the other has nothing left to steal.
_RUN_FIRST = (
    "tests/test_readme.py::test_every_python_block_of_the_readme_runs_in_order",
)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: item.nodeid.split("[")[0] not in _RUN_FIRST)
  first_of = set()
  for item in items:
    base = item.nodeid.split("[")[0]
    if base in _SLOW_TESTS:
      item.add_marker(pytest.mark.slow)
      continue
    callspec = getattr(item, "callspec", None)
    if callspec is None or not _in_matrix(item.nodeid):
      continue
    representative = any(
        token == name or token.startswith(name + "-")
        for token in (callspec.id, *callspec.id.split("-"))
        for name in _REPRESENTATIVE)
    if representative or base not in first_of:
      first_of.add(base)
      continue
    item.add_marker(pytest.mark.slow)


# Every compiled XLA:CPU program keeps a few memory mappings (its code and
# constants) for as long as JAX caches it. A worker of the exhaustive tier
# compiles tens of thousands of programs, and Linux's default limit of 65,530
# mappings per process (vm.max_map_count) is reached after a few thousand
# tests: LLVM's next allocation fails and the worker dies with a segmentation
# fault inside the compiler. So, every few tests, a worker close to the
# limit drops JAX's caches (each test builds its own programs; the cost is a
# recompile of what the next tests share).
_MAPS_CHECK_EVERY = 25
_MAPS_SOFT_LIMIT = 25_000
_tests_since_maps_check = 0


def _memory_mappings() -> int:
  try:
    with open("/proc/self/maps", "rb") as maps:
      return sum(1 for _ in maps)
  except OSError:  # not Linux
    return 0


def pytest_runtest_teardown(item, nextitem):
  del item, nextitem
  global _tests_since_maps_check
  _tests_since_maps_check += 1
  if _tests_since_maps_check < _MAPS_CHECK_EVERY:
    return
  _tests_since_maps_check = 0
  if _memory_mappings() > _MAPS_SOFT_LIMIT:
    import gc  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    jax.clear_caches()
    gc.collect()
