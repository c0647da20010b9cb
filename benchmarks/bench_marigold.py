"""MARIGOLD benchmark: step time versus K, and losses after a fixed budget.

One model for every method: an MLP trunk (64 -> 256 -> 256, tanh) with K
linear regression outputs, on synthetic multi-task regression data whose
tasks share a latent structure, conflict in sign and differ in scale. Per
K in 2 ... 64 and per method:

* step time: one jitted training step (losses, gradient(s), the method, Adam
  1e-3) after a warm-up call (compilation excluded): the minimum over
  repeats (robust to other processes on a shared machine; the median is
  recorded too);
* final losses (K = 2, 8, 32; three seeds of data, initialisation and
  mini-batch order, the same for every method): 200 Adam steps in one
  ``lax.scan``, then every task's loss on the whole training set; for
  MARIGOLD also how far its last weights are from the exact method's at its
  final parameters.

Methods: MARIGOLD (single backward pass of a weighted loss via
``mo.value_and_weighted_grad``; criteria MGDA and CAGrad with the default
zeroth-order estimator, and MGDA with ``estimator='jvp'``, exact Gram-vector
products by one forward-mode pass), exact MGDA and
exact CAGrad on per-task gradients (``mo.value_and_task_grads``: K vmapped
backward passes), and the plain mean (one backward, reference). One process.
Writes ``benchmarks/results/marigold.json`` and ``marigold.png``.

    python benchmarks/bench_marigold.py [--quick] [--methods marigold,marigold_jvp]
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

WIDTHS = (64, 256, 256)
BATCH = 128
NUM_SAMPLES = 4096
LEARNING_RATE = 1e-3
METHODS = ("marigold", "marigold_jvp", "marigold_cagrad", "mgda", "cagrad",
           "mean")


def make_data(num_tasks, seed=0):
  """Tasks y_k = s_k tanh(x . u_k) + noise: directions u_k from a shared
  4-dimensional subspace plus a task-specific part, random signs (conflict)
  and scales s_k log-uniform in [0.3, 3] (imbalance)."""
  rng = np.random.default_rng(seed)
  d = WIDTHS[0]
  shared = rng.normal(size=(4, d)) / np.sqrt(d)
  mix = rng.normal(size=(num_tasks, 4))
  own = rng.normal(size=(num_tasks, d)) / np.sqrt(d)
  directions = mix @ shared + 0.5 * own
  scales = np.exp(rng.uniform(np.log(0.3), np.log(3.0), size=num_tasks))
  x = rng.normal(size=(NUM_SAMPLES, d))
  y = scales * np.tanh(x @ directions.T * 2) + 0.05 * rng.normal(
      size=(NUM_SAMPLES, num_tasks))
  return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def init_params(num_tasks, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(WIDTHS))
  params = {}
  for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
    params[f"dense{i}"] = {
        "kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
        "bias": jnp.zeros(b)}
  params["heads"] = {
      "kernel": jax.random.normal(keys[-1], (WIDTHS[-1], num_tasks)) /
                np.sqrt(WIDTHS[-1]),
      "bias": jnp.zeros(num_tasks)}
  return params


def task_losses(params, x, y):
  h = x
  for i in range(len(WIDTHS) - 1):
    h = jnp.tanh(h @ params[f"dense{i}"]["kernel"] + params[f"dense{i}"]["bias"])
  out = h @ params["heads"]["kernel"] + params["heads"]["bias"]
  return jnp.mean((out - y) ** 2, axis=0)


def make_step(name, num_tasks):
  """A training step ``(params, opt_state, x, y) -> (params, opt_state)``."""
  if name == "mean":  # one backward pass of the mean loss, plain Adam
    tx = optax.adam(LEARNING_RATE)

    def step(params, opt_state, x, y):
      grads = jax.grad(lambda p: jnp.mean(task_losses(p, x, y)))(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return tx, step
  if name.startswith("marigold"):
    criterion = "cagrad" if name == "marigold_cagrad" else "mgda"
    estimator = "jvp" if name == "marigold_jvp" else "gram_vector"
    method = mo.marigold(num_tasks, criterion, estimator)
    tx = optax.chain(method, optax.adam(LEARNING_RATE))

    def step(params, opt_state, x, y):
      losses, grads = mo.value_and_weighted_grad(task_losses, method)(
          opt_state[0], params, x, y)
      updates, opt_state = tx.update(
          grads, opt_state, params, task_losses=losses,
          loss_fn=lambda p: task_losses(p, x, y))
      return optax.apply_updates(params, updates), opt_state
    return tx, step
  method = {"mgda": lambda: mo.mgda(num_tasks),
            "cagrad": lambda: mo.cagrad(num_tasks, c=0.4)}[name]()
  tx = optax.chain(method, optax.adam(LEARNING_RATE))

  def step(params, opt_state, x, y):
    losses, grads = mo.value_and_task_grads(task_losses)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses)
    return optax.apply_updates(params, updates), opt_state
  return tx, step


def time_step(name, num_tasks, repeats):
  x, y = make_data(num_tasks)
  params = init_params(num_tasks)
  tx, step = make_step(name, num_tasks)
  step = jax.jit(step)
  state = tx.init(params)
  xb, yb = x[:BATCH], y[:BATCH]
  params, state = jax.block_until_ready(step(params, state, xb, yb))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    params, state = jax.block_until_ready(step(params, state, xb, yb))
    times.append(time.perf_counter() - t0)
  return float(np.min(times)), float(np.median(times))


def make_training_run(name, num_tasks):
  """A jitted ``(params, x, y, batches) -> (losses, params, state)``, compiled
  once per method and K and reused for every seed."""
  tx, step = make_step(name, num_tasks)

  @jax.jit
  def run(params, x, y, batches):
    def body(carry, idx):
      params, state = carry
      return step(params, state, x[idx], y[idx]), None
    (params, state), _ = jax.lax.scan(body, (params, tx.init(params)),
                                      batches)
    return task_losses(params, x, y), params, state
  return run


def train(run, name, num_tasks, num_steps, seed):
  x, y = make_data(num_tasks, seed)
  batches = jax.random.randint(jax.random.PRNGKey(seed + 1),
                               (num_steps, BATCH), 0, NUM_SAMPLES)
  losses, params, state = run(init_params(num_tasks, seed), x, y, batches)
  tracking = None
  if name.startswith("marigold"):
    # How far the single-loop weights are from the exact method's weights at
    # the final parameters, on the last mini-batch (sum of |differences|).
    idx = batches[-1]
    _, grads = mo.value_and_task_grads(task_losses)(params, x[idx], y[idx])
    exact = (mo.cagrad(num_tasks, c=0.4) if name == "marigold_cagrad" else
             mo.mgda(num_tasks))
    _, exact_state = exact.update(grads, exact.init(params))
    ours = optax.tree.get(state, "weights")
    tracking = dict(
        weights_l1_to_exact=float(jnp.sum(jnp.abs(ours - exact_state.weights))),
        exact_l1_to_uniform=float(jnp.sum(jnp.abs(
            exact_state.weights - jnp.mean(exact_state.weights)))))
  return np.asarray(losses, np.float64), tracking


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  for name in results["methods"]:
    rows = [r for r in results["timing"] if r["method"] == name]
    ax1.plot([r["K"] for r in rows], [1e3 * r["step_s"] for r in rows], "o-",
             label=name)
    ks = results["training_sizes"]
    ax2.plot(ks, [results["median_final_mean_loss"][name][str(k)]
                  for k in ks], "o-", label=name)
  for ax in (ax1, ax2):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of tasks K")
    ax.grid(alpha=0.3)
  ax1.set_yscale("log")
  ax1.set_ylabel("training step (ms, min over repeats)")
  ax1.set_title(f"Step time (MLP {WIDTHS} + K heads, batch {BATCH}, CPU)")
  ax2.set_ylabel(f"mean task loss after {results['steps']} steps")
  ax2.set_title(f"Final loss (median of {len(results['seeds'])} seeds)")
  ax1.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="fewer K, repeats, seeds and steps (smoke run)")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated subset of " + ",".join(METHODS))
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "marigold.json"))
  args = parser.parse_args()
  sizes = (2, 8, 64) if args.quick else (2, 4, 8, 16, 32, 64)
  training_sizes = (2, 8) if args.quick else (2, 8, 32)
  seeds = (0,) if args.quick else (0, 1, 2)
  repeats = 5 if args.quick else 30
  num_steps = args.steps or (100 if args.quick else 200)
  methods = tuple(args.methods.split(","))
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} "
        f"cores); MLP {WIDTHS} + K heads, batch {BATCH}, Adam "
        f"{LEARNING_RATE}")
  t_start = time.perf_counter()
  print("Step time (min over repeats; median in brackets):")
  timing = []
  for num_tasks in sizes:
    line = f"  K={num_tasks:3d}"
    for name in methods:
      step_s, median_s = time_step(name, num_tasks, repeats)
      timing.append(dict(method=name, K=num_tasks, step_s=step_s,
                         step_median_s=median_s))
      line += f"  {name} {1e3 * step_s:.2f} ({1e3 * median_s:.2f}) ms"
    print(line)
  print(f"Final task losses after {num_steps} steps, seeds {seeds}:")
  training = []
  for num_tasks in training_sizes:
    runs = {name: make_training_run(name, num_tasks) for name in methods}
    for seed in seeds:
      for name in methods:
        losses, tracking = train(runs[name], name, num_tasks, num_steps,
                                 seed)
        training.append(dict(method=name, K=num_tasks, seed=seed,
                             final_mean_loss=float(losses.mean()),
                             final_losses=losses.round(5).tolist(),
                             tracking=tracking))
        print(f"  K={num_tasks:3d} seed {seed} {name:16s} mean loss "
              f"{losses.mean():.4f}" + ("" if tracking is None else
              "   |w - w_exact|_1 {weights_l1_to_exact:.3f} (|w_exact - "
              "1/K|_1 {exact_l1_to_uniform:.3f})".format(**tracking)))
  time_of = {(r["method"], r["K"]): r["step_s"] for r in timing}
  loss_of = {(r["method"], r["K"], r["seed"]): r["final_mean_loss"]
             for r in training}
  median_loss = {name: {str(k): float(np.median(
      [loss_of[(name, k, s)] for s in seeds])) for k in training_sizes}
                 for name in methods}
  ratio = lambda a, b, k: [loss_of[(a, k, s)] / loss_of[(b, k, s)]
                           for s in seeds]
  k_lo, k_hi = sizes[0], sizes[-1]
  ratios = {  # time and loss ratios of the methods that were run
      "marigold_time_Kmax_over_Kmin": ("time_k", "marigold"),
      "marigold_cagrad_time_Kmax_over_Kmin": ("time_k", "marigold_cagrad"),
      "mgda_over_marigold_time_at_Kmax": ("time", "mgda", "marigold"),
      "cagrad_over_marigold_cagrad_time_at_Kmax": ("time", "cagrad",
                                                   "marigold_cagrad"),
      "marigold_over_mgda_final_loss_per_seed": ("loss", "marigold", "mgda"),
      "marigold_cagrad_over_cagrad_final_loss_per_seed": (
          "loss", "marigold_cagrad", "cagrad"),
      "marigold_jvp_over_marigold_time_per_K": ("time_per_k", "marigold_jvp",
                                                "marigold"),
      "marigold_jvp_over_marigold_final_loss_per_seed": (
          "loss", "marigold_jvp", "marigold")}
  summary = {}
  for key, (kind, *names) in ratios.items():
    if not set(names) <= set(methods):
      continue
    if kind == "time_k":
      summary[key] = time_of[(names[0], k_hi)] / time_of[(names[0], k_lo)]
    elif kind == "time":
      summary[key] = time_of[(names[0], k_hi)] / time_of[(names[1], k_hi)]
    elif kind == "time_per_k":
      summary[key] = {str(k): [time_of[(names[0], k)] / time_of[(names[1], k)]]
                      for k in sizes}
    else:
      summary[key] = {str(k): ratio(*names, k) for k in training_sizes}
  summary.update(
      wall_s=time.perf_counter() - t_start)
  print("summary:")
  for key, value in summary.items():
    if isinstance(value, dict):
      value = {k: [round(v, 3) for v in vs] for k, vs in value.items()}
    elif isinstance(value, float):
      value = round(value, 3)
    print(f"  {key}: {value}")
  results = dict(device=str(jax.devices()[0]), cores=os.cpu_count(),
                 jax=jax.__version__, quick=args.quick, steps=num_steps,
                 widths=WIDTHS, batch=BATCH, methods=methods, seeds=seeds,
                 training_sizes=training_sizes, timing=timing,
                 training=training, median_final_mean_loss=median_loss,
                 summary=summary)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.splitext(args.out)[0] + ".png")
  print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png")


if __name__ == "__main__":
  main()
