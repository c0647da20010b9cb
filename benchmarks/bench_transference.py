"""Transference benchmark: the cost of tracking TAG's inter-task affinity.

A multi-task MLP (shared trunk 64-256-256 tanh, one linear head per task,
batch 256, squared error) trained with plain SGD on the mean gradient. The
same jitted training step is timed

* plain: ``value_and_task_grads`` + ``linear_scalarization`` + SGD;
* with ``mo.track_affinity(K, lr, update_every=1)`` in front (a look-ahead of K + 1
  points every step);
* with ``update_every=10`` (TAG's efficient default; ``lax.cond`` skips the other
  nine steps);
* for reference, ``mo.it_mtl`` (mean and PCGrad candidates, 2 look-aheads).

Each variant runs ``steps`` steps inside one jitted ``lax.scan`` (so the
``update_every=10`` cadence is amortised over the scan). The variants are timed
interleaved after a warm-up call (compilation excluded); the table reports
the minimum over repeats per step (the least disturbed by other processes on
a shared machine; medians are in the JSON) and its ratio to the plain step,
for K = 2, 4, 8, 16. Writes
``benchmarks/results/transference.json`` and prints a table.

    python benchmarks/bench_transference.py [--quick]
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
import optax

import mtl_optax as mo

LR = 1e-2


def _interleaved_times(fns, repeats, *args):
  """Per-call times of every fn, the variants interleaved in each repeat so
  that load from other processes hits them alike; ``(min, median)`` each."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      samples[name].append(time.perf_counter() - t0)
  return {name: (float(np.min(t)), float(np.median(t)))
          for name, t in samples.items()}


def _problem(num_tasks, batch, width, seed=0):
  rng = np.random.default_rng(seed)
  d_in = 64
  params = {
      "trunk": {"w1": rng.normal(size=(d_in, width)) / np.sqrt(d_in),
                "b1": np.zeros(width),
                "w2": rng.normal(size=(width, width)) / np.sqrt(width),
                "b2": np.zeros(width)},
      "heads": rng.normal(size=(num_tasks, width)) / np.sqrt(width),
  }
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(batch, d_in)), jnp.float32)
  y = jnp.asarray(np.tanh(rng.normal(size=(batch, num_tasks))), jnp.float32)

  def task_losses(p, x, y):
    h = jnp.tanh(x @ p["trunk"]["w1"] + p["trunk"]["b1"])
    h = jnp.tanh(h @ p["trunk"]["w2"] + p["trunk"]["b2"])
    return 0.5 * jnp.mean((h @ p["heads"].T - y) ** 2, axis=0)

  return params, x, y, task_losses


def _runner(tx, task_losses, steps):
  @jax.jit
  def run(params, x, y):
    def step(carry, _):
      params, state = carry
      loss_fn = lambda p: task_losses(p, x, y)
      losses, grads = mo.value_and_task_grads(loss_fn)(params)
      updates, state = tx.update(grads, state, params, task_losses=losses,
                                 loss_fn=loss_fn)
      return (optax.apply_updates(params, updates), state), None
    # Return the state too: otherwise XLA drops the (unused) affinity work.
    (params, state), _ = jax.lax.scan(step, (params, tx.init(params)), None,
                                      length=steps)
    return params, state
  return run


def bench(sizes, steps, repeats, batch, width):
  rows = []
  print(f"{'K':>3} {'plain ms':>9} {'every=1':>16} {'every=10':>16} "
        f"{'it_mtl':>16}")
  for num_tasks in sizes:
    params, x, y, task_losses = _problem(num_tasks, batch, width)
    shared = {"trunk": True, "heads": False}
    variants = {
        "plain": optax.chain(mo.linear_scalarization(num_tasks),
                             optax.sgd(LR)),
        "every_1": optax.chain(
            mo.track_affinity(num_tasks, LR, update_every=1, shared_mask=shared),
            mo.linear_scalarization(num_tasks), optax.sgd(LR)),
        "every_10": optax.chain(
            mo.track_affinity(num_tasks, LR, update_every=10, shared_mask=shared),
            mo.linear_scalarization(num_tasks), optax.sgd(LR)),
        "it_mtl": optax.chain(mo.it_mtl(num_tasks, lookahead_lr=LR),
                              optax.sgd(LR)),
    }
    runners = {name: _runner(tx, task_losses, steps)
               for name, tx in variants.items()}
    timed = _interleaved_times(runners, repeats, params, x, y)
    times = {name: t[0] / steps for name, t in timed.items()}
    row = {"num_tasks": num_tasks,
           **{f"{k}_ms": 1e3 * v for k, v in times.items()},
           **{f"{k}_median_ms": 1e3 * t[1] / steps
              for k, t in timed.items()},
           **{f"{k}_ratio": v / times["plain"] for k, v in times.items()
              if k != "plain"}}
    rows.append(row)
    print(f"{num_tasks:>3} {row['plain_ms']:9.3f} "
          + " ".join(f"{row[k + '_ms']:7.3f} ({row[k + '_ratio']:5.2f}x)"
                     for k in ("every_1", "every_10", "it_mtl")))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer repeats and steps (smoke run)")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "transference.json"))
  args = parser.parse_args()
  repeats = 3 if args.quick else 9
  steps = 20 if args.quick else 40
  batch, width = 256, 256
  sizes = (2, 4, 8, 16)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores); MLP 64-{width}-{width} + K heads, batch {batch}, "
        f"{steps} steps per jitted scan, min of {repeats}; time per step "
        "and ratio to the plain step:")
  rows = bench(sizes, steps, repeats, batch, width)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "cores": os.cpu_count(),
               "jax": jax.__version__, "quick": args.quick, "steps": steps,
               "repeats": repeats, "batch": batch, "width": width,
               "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
