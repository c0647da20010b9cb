"""Peak memory and time of a training step with large task heads, with and
without ``value_and_task_grads(..., shared=...)``.

K = 8 tasks; a small shared trunk and K large heads (dense-prediction style,
most of the parameters). Without ``shared=`` every head's gradient is
stacked K times (K - 1 copies zero); with it only the trunk is. The step is
``value_and_task_grads`` + ``optax.partition({'shared': mgda, 'head':
task_sum})`` + SGD, compiled once; peak memory is XLA's
``memory_analysis()`` of the compiled step (arguments + outputs + temporaries
minus aliased), time the median of repeated calls.

Run: ``python benchmarks/bench_shared_heads.py`` (writes
``benchmarks/results/shared_heads.json``).
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import mtl_optax as mo

K = 8
BATCH, D_IN, D_TRUNK, D_HEAD = 64, 128, 256, 2048
REPEATS = 10


def make_params(key):
  k = jax.random.split(key, 3)
  return {"trunk": {"w": jax.random.normal(k[0], (D_IN, D_TRUNK)) * 0.05},
          "heads": {"w": jax.random.normal(k[1], (K, D_TRUNK, D_HEAD)) * 0.05}}


def task_losses(params, x, y):
  z = jnp.tanh(x @ params["trunk"]["w"])
  out = jnp.einsum("bd,kdo->kbo", z, params["heads"]["w"])
  return jnp.mean((out - y) ** 2, axis=(1, 2))


LABELS = mo.label_by_path({"trunk": "shared", "heads": "head"})
SHARED = {"trunk": True, "heads": False}


def make_step(shared):
  tx = optax.chain(optax.partition(
      {"shared": mo.mgda(K), "head": mo.task_sum(K)}, LABELS),
      optax.sgd(1e-2))

  def step(params, opt_state, x, y):
    losses, grads = mo.value_and_task_grads(task_losses, shared=shared)(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  return tx, step


def measure(shared):
  params = make_params(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (BATCH, D_IN))
  y = jax.random.normal(jax.random.key(2), (K, BATCH, D_HEAD))
  tx, step = make_step(shared)
  opt_state = tx.init(params)
  compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
  mem = compiled.memory_analysis()
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes
          + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  out = compiled(params, opt_state, x, y)
  jax.block_until_ready(out)
  times = []
  for _ in range(REPEATS):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, opt_state, x, y))
    times.append(time.perf_counter() - start)
  return {"peak_bytes": int(peak), "temp_bytes": int(mem.temp_size_in_bytes),
          "median_s": statistics.median(times), "losses": out[2].tolist()}


def main():
  head_bytes = K * D_TRUNK * D_HEAD * 4
  trunk_bytes = D_IN * D_TRUNK * 4
  stacked = measure(None)
  mixed = measure(SHARED)
  saved = stacked["peak_bytes"] - mixed["peak_bytes"]
  result = {
      "device": str(jax.devices()[0].device_kind),
      "K": K, "head_params_bytes": head_bytes,
      "trunk_params_bytes": trunk_bytes,
      "heads_copies_bytes": (K - 1) * head_bytes,
      "stacked": stacked, "shared": mixed,
      "peak_saved_bytes": saved,
      "saved_over_heads_copies": saved / ((K - 1) * head_bytes),
      "time_ratio_shared_over_stacked": mixed["median_s"] / stacked["median_s"],
  }
  path = pathlib.Path(__file__).parent / "results" / "shared_heads.json"
  path.write_text(json.dumps(result, indent=2) + "\n")
  for name in ("stacked", "shared"):
    r = result[name]
    print(f"{name:8s} peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
          f"temp {r['temp_bytes'] / 2**20:8.1f} MiB  "
          f"step {r['median_s'] * 1e3:7.1f} ms")
  print(f"saved {saved / 2**20:.1f} MiB = "
        f"{result['saved_over_heads_copies']:.2f} x the heads' (K-1) copies "
        f"({(K - 1) * head_bytes / 2**20:.1f} MiB); time ratio "
        f"{result['time_ratio_shared_over_stacked']:.2f}")


if __name__ == "__main__":
  main()
