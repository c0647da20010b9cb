"""Cost of every stacked-gradient aggregator, relative to MGDA.

Each method's jitted ``tx.update(grads, state, params, task_losses=...)`` on
the same stacked gradients: a flat K x P stack (P = 1e6) and the MLP
parameter tree of ``bench_foundation.py`` (784-512-512-256), K = 2, 10, 40.
The gradients share a common component with task-dependent signs, so some
tasks conflict and the iterative solvers have work to do. Every time is the
median over repeats after a warm-up call (compilation excluded), in one
process, and is reported as a ratio to MGDA's on the same input (target of
target: no method above 1.5x MGDA).

Writes ``benchmarks/results/aggregators.json`` (``aggregators_quick.json``
with ``--quick``) and prints a table.

    python benchmarks/bench_aggregators.py [--quick] [--methods a,b,...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

import mtl_optax as mo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_foundation import _median_time  # noqa: E402  pylint: disable=g-import-not-at-top
from bench_foundation import _mlp_grads  # noqa: E402  pylint: disable=g-import-not-at-top

TARGET = 1.5  # target: no method slower than 1.5x MGDA

# name -> factory(K), or None where the method does not apply to K.
METHODS = {
    "mgda": mo.mgda,
    "linear_scalarization": mo.linear_scalarization,
    "constant": lambda k: mo.linear_scalarization(k, np.linspace(1.0, 2.0, k)),
    "random_weighting": mo.random_weighting,
    "cagrad": lambda k: mo.cagrad(k, c=0.4),
    "pcgrad": mo.pcgrad,
    "gradvac": mo.gradvac,
    "graddrop": mo.graddrop,
    "upgrad": mo.upgrad,
    "dualproj": mo.dualproj,
    "imtl_g": mo.imtl_g,
    "aligned_mtl": mo.aligned_mtl,
    "config": mo.config,
    "nash_mtl": mo.nash_mtl,
    "fairgrad": mo.fairgrad,
    "excess_mtl": mo.excess_mtl,
    "krum": lambda k: mo.krum(k, n_byzantine=1, n_selected=k // 2) if (
        k >= 4) else None,
    "trimmed_mean": lambda k: mo.trimmed_mean(k, trim_number=1) if (
        k >= 3) else None,
    "moco": mo.moco,
    "db_mtl": mo.db_mtl,
    "sdmgrad": mo.sdmgrad,  # single batch: J J^T in place of J J'^T
    "modo": mo.modo,
}

# Public factories deliberately not timed here, and why.
NOT_TIMED = {
    "task_sum": "a plain sum, no weighting (as linear_scalarization)",
    "ema_weights": "a wrapper: costs its inner method plus a K-vector EMA",
    "marigold": "needs loss_fn (look-ahead; benchmarks/bench_marigold.py)",
    "it_mtl": "needs loss_fn (look-ahead; benchmarks/bench_transference.py)",
    "track_affinity": "needs loss_fn (look-ahead)",
}


def _grads(layout, num_tasks, size_p, key):
  """Stacked gradients: a shared component with signs drawn per task, plus
  noise, so that some tasks conflict."""
  k_sign, k_noise = jax.random.split(key)
  coef = 0.5 + jax.random.normal(k_sign, (num_tasks,))
  if layout == "flat":
    noise = jax.random.normal(k_noise, (num_tasks, size_p))
  else:
    noise = _mlp_grads(k_noise, num_tasks)
  return jax.tree.map(
      lambda x: x + coef.reshape((-1,) + (1,) * (x.ndim - 1)) * x[:1], noise)


def _untimed_public_factories():
  """Public factories that are neither timed nor listed in NOT_TIMED."""
  known = set(METHODS) | set(NOT_TIMED)
  out = []
  for name in mo.__all__:
    obj = getattr(mo, name)
    if name[0].isupper() or isinstance(obj, type) or not callable(obj):
      continue
    if name not in known:
      out.append(name)
  return out


def bench(layouts, sizes, size_p, repeats, methods):
  rows = []
  for layout in layouts:
    for num_tasks in sizes:
      grads = _grads(layout, num_tasks, size_p, jax.random.PRNGKey(num_tasks))
      params = jax.tree.map(lambda g: jnp.zeros_like(g[0]), grads)
      num_params = sum(x.size for x in jax.tree.leaves(params))
      losses = jnp.linspace(1.0, 2.0, num_tasks)
      times = {}
      for name in methods:
        tx = METHODS[name](num_tasks)
        if tx is None:
          continue
        state = tx.init(params)
        step = jax.jit(lambda g, s, l, tx=tx: tx.update(g, s, params,
                                                        task_losses=l))
        times[name] = _median_time(step, repeats, grads, state, losses)
      mgda = times["mgda"]
      for name, seconds in times.items():
        rows.append(dict(layout=layout, K=num_tasks, P=int(num_params),
                         method=name, ms=1e3 * seconds,
                         over_mgda=seconds / mgda))
      print(f"  done: {layout} K={num_tasks} P={num_params}", flush=True)
      del grads
  return rows


def _print_table(rows, methods):
  columns = sorted({(r["layout"], r["K"], r["P"]) for r in rows},
                   key=lambda c: (c[0] != "flat", c[1]))
  cell = {(r["method"], r["layout"], r["K"]): r for r in rows}
  header = "  ".join(f"{layout} K={k:<3d}".rjust(18) for layout, k, _ in columns)
  print(f"\n{'time / MGDA (ms)':22s}{header}")
  for name in methods:
    line = []
    for layout, k, _ in columns:
      r = cell.get((name, layout, k))
      if r is None:
        line.append("n/a".rjust(18))
      else:
        flag = "!" if r["over_mgda"] > TARGET else " "
        line.append(f"{r['over_mgda']:5.2f}{flag}({r['ms']:8.2f})".rjust(18))
    print(f"{name:22s}" + "  ".join(line))
  print("P per column: " + ", ".join(f"{layout} K={k}: {p}"
                                     for layout, k, p in columns))
  slow = sorted({r["method"] for r in rows if r["over_mgda"] > TARGET})
  print(f"'!' marks a ratio above the target {TARGET}x MGDA: "
        f"{', '.join(slow) if slow else 'none'}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="small P, K = 2 and 10, few repeats (smoke run)")
  parser.add_argument("--methods", default=None,
                      help="comma-separated subset (mgda is always timed)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  methods = list(METHODS)
  if args.methods:
    chosen = args.methods.split(",")
    unknown = set(chosen) - set(METHODS)
    if unknown:
      parser.error(f"unknown methods {sorted(unknown)}; known: {methods}")
    methods = ["mgda"] + [m for m in chosen if m != "mgda"]
  if args.quick:
    repeats, size_p, sizes, layouts = 3, 20_000, (2, 10), ("flat",)
  else:
    repeats, size_p, sizes, layouts = 20, 1_000_000, (2, 10, 40), ("flat",
                                                                   "mlp")
  out = args.out or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results",
      "aggregators_quick.json" if args.quick else "aggregators.json")
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores); median of {repeats} jitted updates after a warm-up")
  missing = _untimed_public_factories()
  if missing:
    print(f"note: public factories not classified here: {missing}")
  rows = bench(layouts, sizes, size_p, repeats, methods)
  _print_table(rows, methods)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "cores": os.cpu_count(),
               "jax": jax.__version__, "quick": args.quick,
               "repeats": repeats, "target_over_mgda": TARGET,
               "not_timed": NOT_TIMED, "rows": rows}, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
