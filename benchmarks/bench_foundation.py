"""Foundation benchmark: CAGrad's dual and Gram-based aggregation.

1. The jitted CAGrad dual (on device) against the official code's approach,
   scipy SLSQP on the host (Cranial-XIX/CAGrad ``nyuv2/utils.py``), on the same
   Gram matrices, K = 2, 10, 40: time per solve and objective reached.
2. Aggregation cost (Gram + solve + weighted sum) of MGDA, CAGrad and PCGrad
   against a plain mean, on a K x P stack (P = 1e6) and on an MLP parameter
   tree, K = 2, 10, 40.

Timings are medians over repeats after a warm-up call (compilation excluded),
one process. Writes ``benchmarks/results/foundation.json`` and prints tables.

    python benchmarks/bench_foundation.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

import mtl_optax as mo
from mtl_optax._src import solvers


def _median_time(fn, repeats, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def _gram(rng, num_tasks):
  g = rng.normal(size=(num_tasks, 4 * num_tasks)) + 0.5 * rng.normal(
      size=(1, 4 * num_tasks))
  return g @ g.T


def _official_objective(gram, c):
  """The official code's objective and constants (nyuv2/utils.py)."""
  num_tasks = len(gram)
  b = np.full(num_tasks, 1.0 / num_tasks)
  g0_norm = np.sqrt(b @ gram @ b + 1e-8)
  c_eff = c * g0_norm + 1e-8
  return lambda w: w @ gram @ b + c_eff * np.sqrt(w @ gram @ w + 1e-8)


def bench_dual(sizes, c, repeats, num_matrices):
  rng = np.random.default_rng(0)
  solve_one = lambda a: solvers.cagrad_dual_weights(
      a / (jnp.trace(a) / a.shape[0]), c)
  solve = jax.jit(solve_one)
  # Inside a training step the dual runs in the compiled program, with no
  # dispatch: time it there too, the solves one after another (lax.map, not
  # vectorised) within one jitted call.
  solve_in_program = jax.jit(
      lambda grams: jax.lax.map(lambda a: solve_one(a).weights, grams))
  rows = []
  for num_tasks in sizes:
    jax_times, scipy_times, gaps, iters = [], [], [], []
    grams = [_gram(rng, num_tasks) for _ in range(num_matrices)]
    stacked = jnp.asarray(np.stack(grams), jnp.float32)
    in_program_s = _median_time(solve_in_program, repeats, stacked) / len(
        grams)
    for gram in grams:
      objective = _official_objective(gram, c)
      b = np.full(num_tasks, 1.0 / num_tasks)

      def slsqp():
        return optimize.minimize(
            objective, b, bounds=[(0.0, 1.0)] * num_tasks,
            constraints={"type": "eq", "fun": lambda x: 1 - np.sum(x)})

      t0 = time.perf_counter()
      for _ in range(max(repeats // 10, 3)):
        res = slsqp()
      scipy_times.append((time.perf_counter() - t0) / max(repeats // 10, 3))
      gram_j = jnp.asarray(gram, jnp.float32)
      jax_times.append(_median_time(solve, repeats, gram_j))
      sol = solve(gram_j)
      iters.append(int(sol.iterations))
      ours = objective(np.asarray(sol.weights, np.float64))
      gaps.append((ours - res.fun) / max(abs(res.fun), 1e-12))
    row = dict(K=num_tasks, jax_us=1e6 * np.median(jax_times),
               jax_in_program_us=1e6 * in_program_s,
               slsqp_us=1e6 * np.median(scipy_times),
               speedup=np.median(scipy_times) / np.median(jax_times),
               speedup_in_program=np.median(scipy_times) / in_program_s,
               worst_relative_objective_gap=float(np.max(gaps)),
               median_iterations=float(np.median(iters)))
    rows.append(row)
    print(f"  K={num_tasks:3d}  jitted dual {row['jax_us']:8.1f} us per call"
          f" ({row['jax_in_program_us']:7.1f} us in a program)   SLSQP "
          f"{row['slsqp_us']:9.1f} us   speed-up {row['speedup']:7.1f}x "
          f"({row['speedup_in_program']:7.1f}x)   "
          f"objective gap vs SLSQP {row['worst_relative_objective_gap']:+.2e}"
          f"   iterations {row['median_iterations']:.0f}")
  return rows


def _methods(num_tasks):
  return {
      "mean": mo.linear_scalarization(num_tasks),
      "mgda": mo.mgda(num_tasks),
      "cagrad": mo.cagrad(num_tasks, c=0.4),
      "pcgrad": mo.pcgrad(num_tasks),
  }


def _mlp_grads(key, num_tasks, widths=(784, 512, 512, 256)):
  tree = {}
  keys = jax.random.split(key, len(widths))
  for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
    tree[f"layer{i}"] = {
        "kernel": jax.random.normal(keys[i], (num_tasks, a, b)),
        "bias": jax.random.normal(keys[i], (num_tasks, b))}
  return tree


def bench_aggregation(sizes, size_p, repeats):
  rows = []
  for layout in ("flat", "mlp"):
    for num_tasks in sizes:
      key = jax.random.PRNGKey(num_tasks)
      if layout == "flat":
        grads = jax.random.normal(key, (num_tasks, size_p))
      else:
        grads = _mlp_grads(key, num_tasks)
      params = jax.tree.map(lambda g: g[0], grads)
      num_params = sum(x.size for x in jax.tree.leaves(params))
      times = {}
      for name, tx in _methods(num_tasks).items():
        state = tx.init(params)
        step = jax.jit(lambda g, s, tx=tx: tx.update(g, s, params))
        times[name] = _median_time(step, repeats, grads, state)
      row = dict(layout=layout, K=num_tasks, P=num_params,
                 **{f"{k}_ms": 1e3 * v for k, v in times.items()},
                 cagrad_over_mgda=times["cagrad"] / times["mgda"],
                 mgda_over_mean=times["mgda"] / times["mean"],
                 pcgrad_over_mgda=times["pcgrad"] / times["mgda"])
      rows.append(row)
      print(f"  {layout:4s} K={num_tasks:3d} P={num_params:8d}  mean "
            f"{row['mean_ms']:7.2f} ms  mgda {row['mgda_ms']:7.2f}  cagrad "
            f"{row['cagrad_ms']:7.2f}  pcgrad {row['pcgrad_ms']:7.2f}   "
            f"cagrad/mgda {row['cagrad_over_mgda']:.2f}  mgda/mean "
            f"{row['mgda_over_mean']:.2f}")
      del grads
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer repeats and a smaller P (smoke run)")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "foundation.json"))
  args = parser.parse_args()
  repeats = 5 if args.quick else 30
  size_p = 100_000 if args.quick else 1_000_000
  sizes = (2, 10, 40)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} "
        "cores)")
  print("CAGrad dual, c = 0.4 (jitted, float32, cold start) vs scipy SLSQP "
        "(float64, official objective):")
  dual = bench_dual(sizes, 0.4, repeats, 3 if args.quick else 10)
  print(f"Aggregation per step (jitted update; P = {size_p} flat, or an MLP "
        "784-512-512-256):")
  agg = bench_aggregation(sizes, size_p, repeats)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "cores": os.cpu_count(),
               "jax": jax.__version__, "quick": args.quick, "dual": dual,
               "aggregation": agg}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
