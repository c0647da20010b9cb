"""How ``value_and_task_grads`` should batch its K backward passes.

Times one forward pass and K backward passes (``mo.value_and_task_grads``,
jitted) for the batching choices on three model families:

* ``auto``       -- the default, ``chunk_size="auto"``: on a CPU one of the
  two below (``unrolled`` when the backward pass has a convolution, else
  ``loop``), on accelerators ``vmap``;
* ``vmap``       -- ``chunk_size=None``, all K backward passes in one
  ``jax.vmap`` (the default before ``"auto"``; ratios are to this row);
* ``loop``       -- ``chunk_size=1``: one task per iteration of a ``lax.map``;
* ``unrolled``   -- ``chunk_size=1, unroll=True``: K backward passes written
  one after the other into the program.

Models: a ReLU MLP with Flax's ``(in, out)`` kernels (1M-parameter trunk,
384-1024-512-256, K linear heads, batch 128: the model of
``compare_torchjd.py``), the same MLP with torch's ``(out, in)`` kernels, and
a small conv net (three 3x3 conv + max-pool layers, 32x32x3 input, batch 32).
Timings are medians of interleaved repeats after compilation (each repeat
starting at another mode); the compile time is kept too. The conv net's
``loop``, 12-18x slower than the others, is timed at K = 2 only. Writes
``benchmarks/results/task_grads.json``.

    python benchmarks/bench_task_grads.py [--quick] [--models convnet]
        [--sizes 2 10] [--modes auto vmap] [--repeats 9]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

# The checkout's package, not an installed copy.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import mtl_optax as mo  # noqa: E402
from benchmarks.micro_gram import cpu_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = {"auto": {}, "vmap": {"chunk_size": None}, "loop": {"chunk_size": 1},
         "unrolled": {"chunk_size": 1, "unroll": True}}


def mlp_problem(num_tasks, torch_layout, widths=(384, 1024, 512, 256),
                batch=128):
  keys = jax.random.split(jax.random.PRNGKey(0), len(widths) + 2)
  trunk = []
  for key, fan_in, fan_out in zip(keys, widths[:-1], widths[1:]):
    shape = (fan_out, fan_in) if torch_layout else (fan_in, fan_out)
    trunk.append({"w": jax.random.normal(key, shape) / np.sqrt(fan_in),
                  "b": jnp.zeros(fan_out)})
  params = {"trunk": trunk,
            "heads": jax.random.normal(keys[-2], (num_tasks, widths[-1]))}
  x = jax.random.normal(keys[-1], (batch, widths[0]))
  y = jnp.zeros((batch, num_tasks))

  def task_losses(params, x, y):
    h = x
    for i, layer in enumerate(params["trunk"]):
      h = (h @ layer["w"].T if torch_layout else h @ layer["w"]) + layer["b"]
      if i < len(params["trunk"]) - 1:
        h = jax.nn.relu(h)
    return jnp.mean((h @ params["heads"].T - y) ** 2, axis=0)

  return task_losses, params, x, y


def conv_problem(num_tasks, batch=32):
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"c1": 0.1 * jax.random.normal(keys[0], (3, 3, 3, 32)),
            "c2": 0.05 * jax.random.normal(keys[1], (3, 3, 32, 64)),
            "c3": 0.05 * jax.random.normal(keys[2], (3, 3, 64, 64)),
            "heads": 0.1 * jax.random.normal(keys[3], (num_tasks, 64))}
  x = jax.random.normal(keys[4], (batch, 32, 32, 3))
  y = jnp.zeros((batch, num_tasks))

  def task_losses(params, x, y):
    h = x
    for name in ("c1", "c2", "c3"):
      h = jax.lax.conv_general_dilated(
          h, params[name], (1, 1), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      h = jax.lax.reduce_window(jax.nn.relu(h), -jnp.inf, jax.lax.max,
                                (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jnp.mean(h, axis=(1, 2))
    return jnp.mean((h @ params["heads"].T - y) ** 2, axis=0)

  return task_losses, params, x, y


def bench(task_losses, params, x, y, repeats, modes):
  fns = {mode: jax.jit(mo.value_and_task_grads(task_losses, **MODES[mode]))
         for mode in modes}
  compile_s, outputs = {}, {}
  for mode, fn in fns.items():
    t0 = time.perf_counter()
    outputs[mode] = jax.block_until_ready(fn(params, x, y))
    compile_s[mode] = time.perf_counter() - t0
  ref = jax.tree.leaves(outputs[modes[0]])
  max_diff = max(
      float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
      for mode in fns for a, b in zip(jax.tree.leaves(outputs[mode]), ref))
  times = {mode: [] for mode in fns}
  for repeat in range(repeats):
    # Each repeat starts at another mode: on a loaded machine no mode
    # always runs right after the same neighbour.
    shift = repeat % len(modes)
    for mode in modes[shift:] + modes[:shift]:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[mode](params, x, y))
      times[mode].append(time.perf_counter() - t0)
  return {"ms": {m: 1e3 * float(np.median(t)) for m, t in times.items()},
          "compile_s": compile_s, "max_rel_diff": max_diff}


PROBLEMS = {
    "mlp_flax_layout": lambda k: mlp_problem(k, torch_layout=False),
    "mlp_torch_layout": lambda k: mlp_problem(k, torch_layout=True),
    "convnet": conv_problem}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="K = 2 only, few repeats")
  parser.add_argument("--out", default=os.path.join(RESULTS,
                                                    "task_grads.json"))
  parser.add_argument("--models", nargs="+", choices=PROBLEMS,
                      default=list(PROBLEMS))
  parser.add_argument("--sizes", nargs="+", type=int, default=None,
                      help="numbers of tasks K (default 2 10 40)")
  parser.add_argument("--modes", nargs="+", choices=MODES,
                      default=list(MODES), help="the first is the reference "
                      "of the max rel diff; ratios are to vmap when run")
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  sizes_k = args.sizes or ((2,) if args.quick else (2, 10, 40))
  repeats = args.repeats or (3 if args.quick else 9)
  rows = []
  for name in args.models:
    for num_tasks in sizes_k:
      # The conv net's loop is 12-18x slower than the rest: timed at K = 2.
      modes = [m for m in args.modes if not (
          name == "convnet" and m == "loop" and num_tasks > 2)]
      row = {"model": name, "K": num_tasks,
             **bench(*PROBLEMS[name](num_tasks), repeats=repeats,
                     modes=modes)}
      rows.append(row)
      ms = row["ms"]
      base_ms = ms.get("vmap", ms[modes[0]])
      print(f"{name:17s} K={num_tasks:3d}  " + "  ".join(
          f"{m} {ms[m]:8.1f} ms ({ms[m] / base_ms:.2f}x)" for m in ms)
            + f"  max rel diff {row['max_rel_diff']:.1e}", flush=True)
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "device": str(jax.devices()[0]), "cpu": cpu_model(),
         "cores": os.cpu_count(),
         "machine": platform.machine(), "quick": args.quick,
         "load_average": os.getloadavg()}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"env": env, "rows": rows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
