"""Command line: ``python -m mtl_optax [toy] [--steps N] [--out DIR]``.

The main job reproduces the CAGrad 2-D toy: Adam on the
mean gradient, MGDA, PCGrad and CAGrad (c = 0.5) from six starts, 100 000
steps each, a table of end points and average losses against the reference
table, and a trajectory plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

# Reference end points (x, y, L0): a float64 re-run of the
# official toy.py's update rules, 100k steps. Used for the "reference" column.
REFERENCE_END_POINTS = {
    "mean gradient (Adam)": [(-5.06, 2.17, 3.30), (0, -8.3551, -15.0916),
                             (-5.63, 0.81, 1.81), (0, -8.3551, -15.0916),
                             (5.04, 2.34, 3.16), (0, -8.3551, -15.0916)],
    "MGDA": [(-5.81, -8.41, -11.72), (-7.00, -8.43, -10.20),
             (-5.84, -8.41, -11.68), (-5.65, -8.41, -11.91),
             (-3.62, -8.38, -13.78), (-3.32, -8.37, -13.99)],
    "PCGrad": [(-3.24, -8.37, -14.04), (-6.45, -8.42, -10.94),
               (-3.55, -8.38, -13.83), (0, -8.3551, -15.0916),
               (2.51, -8.37, -14.46), (6.62, -8.43, -10.71)],
    "CAGrad (c=0.5)": [(0, -8.3551, -15.0916)] * 6,
}


def _plot(results, starts, path, l0_grid):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  xs, ys, l0 = l0_grid
  fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2),
                           sharey=True)
  for ax, (name, run) in zip(np.atleast_1d(axes), results.items()):
    ax.contourf(xs, ys, l0, levels=30, cmap="Greys", alpha=0.6)
    ax.plot([-7, 7], [-8.3551, -8.3551], color="tab:green", lw=3, alpha=0.6,
            label="Pareto set")
    for traj in np.asarray(run.trajectories):
      ax.plot(traj[:, 0], traj[:, 1], lw=1.5)
      ax.scatter(traj[-1, 0], traj[-1, 1], marker="x", color="k", zorder=3)
    ax.scatter(*np.asarray(starts).T, color="k", s=12, zorder=3)
    ax.scatter([0], [-8.3551], marker="*", s=150, color="gold", zorder=4,
               label="min L0")
    ax.set_title(name)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
  np.atleast_1d(axes)[0].legend(loc="upper right", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run_toy_job(steps: int, out_dir: str) -> dict:
  import jax
  import jax.numpy as jnp
  from mtl_optax import toy

  results, table = {}, {}
  print(f"CAGrad 2-D toy: Adam(lr=1e-3), {steps} steps, "
        f"{len(toy.TOY_STARTS)} starts, float32, {jax.default_backend()}")
  for name, make in toy.default_methods().items():
    t0 = time.perf_counter()
    run = toy.run_toy(make(), num_steps=steps, record_every=max(steps // 200, 1))
    jax.block_until_ready(run.final)
    results[name] = run
    l0 = np.asarray(run.final_losses).mean(axis=1)
    table[name] = [dict(start=list(s), end=np.asarray(e).tolist(), L0=float(v))
                   for s, e, v in zip(toy.TOY_STARTS, run.final, l0)]
    print(f"\n{name}  ({time.perf_counter() - t0:.1f} s incl. compile)")
    print(f"  {'start':>14} | {'end point':>18} | {'L0':>9} | reference end (L0)")
    for start, row, ref in zip(toy.TOY_STARTS, table[name],
                               REFERENCE_END_POINTS[name]):
      end = row["end"]
      print(f"  ({start[0]:5.1f}, {start[1]:5.1f}) | ({end[0]:7.3f}, "
            f"{end[1]:7.3f}) | {row['L0']:9.4f} | ({ref[0]:.2f}, {ref[1]:.2f}) "
            f"({ref[2]:.2f})")
    print(f"  average L0 over starts: {l0.mean():.4f}   "
          f"(optimum {toy.L0_MIN})")

  os.makedirs(out_dir, exist_ok=True)
  xs, ys = np.meshgrid(np.linspace(-10, 10, 201), np.linspace(-10, 10, 201))
  grid = jnp.stack([xs.ravel(), ys.ravel()], axis=1).astype(jnp.float32)
  l0 = np.asarray(jax.vmap(toy.toy_losses)(grid).mean(axis=1)).reshape(xs.shape)
  plot_path = os.path.join(out_dir, "toy_trajectories.png")
  _plot(results, toy.TOY_STARTS, plot_path, (xs, ys, l0))
  with open(os.path.join(out_dir, "toy_results.json"), "w") as f:
    json.dump({"steps": steps, "results": table}, f, indent=1)
  print(f"\nwrote {plot_path} and {os.path.join(out_dir, 'toy_results.json')}")
  return table


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mtl_optax",
      description="Reproductions on the built-in problems of mtl_optax.")
  parser.add_argument("job", nargs="?", default="toy", choices=["toy"],
                      help="toy: the CAGrad 2-D toy (default)")
  parser.add_argument("--steps", type=int, default=100_000,
                      help="optimisation steps per start (default 100000)")
  parser.add_argument("--out", default="toy_output",
                      help="output directory for the plot and JSON")
  args = parser.parse_args(argv)
  run_toy_job(args.steps, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
