"""Compile time of one jitted training step, for every public method.

Two models, K = 3 tasks, the whole step jitted (per-task gradients with
``mo.value_and_task_grads``, the method's ``update``, the optimizer and
``optax.apply_updates``):

* ``mlp``  -- a small MLP (16 -> 64 -> 64 -> 3 heads, 6 leaves) with Adam;
* ``wide`` -- a 200-leaf tree of leaves shaped ``(2,)`` (a stand-in for the
  many small leaves of a ResNet or a transformer) with SGD.

Each method is built as the conformance registry builds it
(``tests/cases``, the first case of each public factory), and the figure is
``jax.jit(step).lower(...)`` plus ``.compile()`` in CPU seconds of this
process (wall time is recorded too; on a shared machine CPU time is the
estimate of the idle figure), with the ratio to ``linear_scalarization`` on
the same model in the same process. Then the
scaling in the number of leaves (``--leaves``) for ``linear_scalarization``
and ``mgda``. XLA flags are the user's (none by default): the test session's
fast-compile flags do not apply here. Writes
``benchmarks/results/compile.json``.

    python benchmarks/bench_compile.py [--methods mgda,upgrad] [--leaves 50,100,200,400]
        [--models mlp,wide] [--repeat 3]

With ``--repeat N`` every method (``linear_scalarization`` first) is compiled
N times in rounds, so that a change of load hits every method alike; each
figure is the median over the rounds, and the ratio is the median of the
per-round ratios to that round's ``linear_scalarization``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import mtl_optax as mo  # noqa: E402
from benchmarks.micro_gram import cpu_model  # noqa: E402
from tests.conftest import all_cases  # noqa: E402

NUM_TASKS = 3


def mlp_problem():
  key = jax.random.PRNGKey(0)
  keys = jax.random.split(key, 5)
  params = {
      "hidden1": {"kernel": jax.random.normal(keys[0], (16, 64)) * 0.2,
                  "bias": jnp.zeros(64)},
      "hidden2": {"kernel": jax.random.normal(keys[1], (64, 64)) * 0.1,
                  "bias": jnp.zeros(64)},
      "heads": {"kernel": jax.random.normal(keys[2], (64, NUM_TASKS)) * 0.1,
                "bias": jnp.zeros(NUM_TASKS)},
  }
  inputs = jax.random.normal(keys[3], (32, 16))
  targets = jax.random.normal(keys[4], (32, NUM_TASKS))

  def task_losses(p):
    h = jnp.tanh(inputs @ p["hidden1"]["kernel"] + p["hidden1"]["bias"])
    h = jnp.tanh(h @ p["hidden2"]["kernel"] + p["hidden2"]["bias"])
    out = h @ p["heads"]["kernel"] + p["heads"]["bias"]
    return jnp.mean((out - targets) ** 2, axis=0)

  return params, task_losses, optax.adam(1e-3)


def wide_problem(num_leaves: int = 200):
  params = {f"leaf{i:03d}": jnp.full((2,), 0.01 * i) for i in range(num_leaves)}
  targets = jnp.linspace(-1.0, 1.0, NUM_TASKS)

  def task_losses(p):
    leaves = jnp.stack(jax.tree.leaves(p))   # (num_leaves, 2)
    return jnp.sum((leaves[None] - targets[:, None, None]) ** 2, axis=(1, 2))

  return params, task_losses, optax.sgd(1e-2)


def compile_seconds(case, problem) -> dict:
  params, task_losses, optimizer = problem
  tx = optax.chain(case.make(NUM_TASKS), optimizer)

  def step(params, state):
    losses, grads = mo.value_and_task_grads(task_losses)(params)
    updates, state = tx.update(grads, state, params,
                               **case.extras(params, losses, task_losses))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  cpu_start, start = time.process_time(), time.perf_counter()
  lowered = jax.jit(step).lower(params, state)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  # CPU seconds estimate the idle-machine time when other processes share
  # the cores (XLA:CPU compiles one program on one thread).
  return {"lower_s": lowered_at - start, "compile_s": done - lowered_at,
          "total_s": done - start, "cpu_s": time.process_time() - cpu_start,
          "hlo_chars": len(lowered.as_text())}


def public_cases(selected):
  """One case per public factory: the one named after it, else its first."""
  chosen = {}
  for case in all_cases():
    first = chosen.setdefault(case.factory, case)
    if (first.name != getattr(case.factory, "__name__", None)
        and case.name == getattr(case.factory, "__name__", None)):
      chosen[case.factory] = case
  return [c for c in chosen.values() if not selected or c.name in selected]


def _median_row(rounds: list) -> dict:
  """Median of every number over the rounds (the first error wins)."""
  errors = [r for r in rounds if "error" in r]
  if errors:
    return errors[0]
  return {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--methods", default="",
                      help="comma-separated case names (default: all)")
  parser.add_argument("--leaves", default="50,100,200,400",
                      help="leaf counts of the scaling table ('' to skip)")
  parser.add_argument("--models", default="mlp,wide",
                      help="comma-separated subset of mlp,wide")
  parser.add_argument("--repeat", type=int, default=1,
                      help="rounds over every method; figures are medians")
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                           "compile.json"))
  args = parser.parse_args()
  selected = set(filter(None, args.methods.split(",")))
  selected |= {"linear_scalarization"} if selected else set()
  cases = public_cases(selected)
  builders = {"mlp": mlp_problem, "wide": lambda: wide_problem(200)}
  problems = {m: builders[m]() for m in args.models.split(",") if m}
  ordered = sorted(cases, key=lambda c: c.name != "linear_scalarization")
  samples = {(c.name, m): [] for c in ordered for m in problems}
  # The process's first compile also initialises the compiler: one discarded
  # compile per model, so that the baseline is not inflated by it.
  for problem in problems.values():
    compile_seconds(ordered[0], problem)
  for _ in range(args.repeat):
    baseline = {}
    for case in ordered:
      for model, problem in problems.items():
        try:
          entry = compile_seconds(case, problem)
        except Exception as err:  # noqa: BLE001 -- report and go on
          samples[case.name, model].append(
              {"error": f"{type(err).__name__}: {err}"[:300]})
          continue
        if case.name == "linear_scalarization":
          baseline[model] = entry["cpu_s"]
        entry["vs_linear_scalarization"] = entry["cpu_s"] / baseline[model]
        samples[case.name, model].append(entry)
  header = " ".join(f"{model + ' cpu s':>10s} {'x LS':>5s}" for model in problems)
  print(f"{'method':28s} {header}")
  rows = []
  for case in ordered:
    row = {"method": case.name, "rounds": args.repeat}
    cells = []
    for model in problems:
      row[model] = entry = _median_row(samples[case.name, model])
      cells += ([f"{entry['cpu_s']:10.2f}",
                 f"{entry['vs_linear_scalarization']:5.2f}"]
                if "error" not in entry else ["     error", "     "])
    rows.append(row)
    print(f"{case.name:28s} {' '.join(cells)}", flush=True)
  by_name = {c.name: c for c in public_cases(set())}
  scaling = []
  for num_leaves in [int(n) for n in args.leaves.split(",") if n]:
    entry = {"leaves": num_leaves}
    for name in ("linear_scalarization", "mgda"):
      entry[name] = compile_seconds(by_name[name],
                                    wide_problem(num_leaves))["cpu_s"]
    scaling.append(entry)
    print(f"{num_leaves:4d} leaves: linear_scalarization "
          f"{entry['linear_scalarization']:.2f} cpu s, mgda "
          f"{entry['mgda']:.2f} cpu s",
          flush=True)
  usage = resource.getrusage(resource.RUSAGE_SELF)
  report = {
      "jax": jax.__version__, "backend": jax.default_backend(),
      "cpu": cpu_model(), "cores": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_avg_end": os.getloadavg()[0],
      "process_cpu_s": usage.ru_utime + usage.ru_stime,
      "num_tasks": NUM_TASKS, "rows": rows, "leaf_scaling": scaling,
  }
  path = pathlib.Path(args.out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(report, indent=1) + "\n")
  print(f"cpu: {report['cpu']}, load {report['load_avg_end']:.1f}, "
        f"process CPU {report['process_cpu_s']:.0f} s; wrote {path}")


if __name__ == "__main__":
  main()
