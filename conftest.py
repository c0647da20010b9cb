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


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: exhaustive matrices, run by .ci/run")
