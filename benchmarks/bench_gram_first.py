"""Memory and time of one training step: stacked path vs Gram-first path.

The model: an MLP trunk of 5.25 million shared parameters (512 -> 2048 ->
2048, tanh) and K linear heads of 2049 parameters each, one squared-error
loss per task on a shared batch. Two training steps, both compiled once with
``jax.jit`` and both with ``tx = optax.chain(optax.partition({'shared':
method, 'head': mo.task_sum(K)}, labels), optax.sgd(1e-2))``:

* stacked: ``mo.value_and_task_grads(task_losses, shared=SHARED)`` (the
  trunk's K per-task gradients stacked, the heads' summed gradient), then
  ``tx.update``;
* Gram-first: ``mo.value_and_gram_weighted_grad(task_losses, tx,
  shared=SHARED, chunk_size=c)`` (the trunk's Gram matrix ``c`` gradients at
  a time, one more backward pass for ``grad sum_i c_i L_i``), then
  ``tx.update(..., gram=gram)``; at its default ``c = 1`` and with all K at
  once (``c = None``).

The stacked path is also measured with ``chunk_size=1`` (its fastest CPU
setting for these ``(in, out)`` kernels; still K gradients stacked).

Figures, per (path, K, method, chunk size), each configuration in a fresh
subprocess so that resident memory is its own:

* XLA's ``compiled.memory_analysis()`` of the compiled step: argument,
  output, temporary and aliased sizes. "peak" is ``argument + output + temp
  - alias``: the buffers of one call that are alive together at worst (XLA
  plans temporaries as one arena, live for the whole call, and neither
  arguments nor outputs are donated here, so they coexist with it). The
  step's own working set is ``temp``; both are reported. These figures are
  properties of the compiled program: they do not depend on the load of the
  machine.
* resident memory (Linux): the high-water mark ``VmHWM`` is reset
  (``/proc/self/clear_refs``) after compilation and one warm-up call, and
  ``step_rss_bytes`` is how far it rises above the resident set during the
  timed calls (what the step allocates that the process did not already
  hold; the allocator may keep buffers between calls, so this is a lower
  bound of the step's footprint, and 0 when everything is reused).
  ``ru_maxrss`` (process lifetime, compilation included) is also recorded.
* time: median of several calls after one warm-up, ``block_until_ready``.
  Times DO depend on the load: the JSON records ``os.getloadavg()`` before
  and after; on a shared machine prefer the memory figures.

Targets (the issue): Gram-first peak at K = 64 at most 1.5x its own K = 2
peak; Gram-first time at most 2.5x the stacked path's at K = 8.

Run: ``python benchmarks/bench_gram_first.py`` (3 to 8 minutes on a
shared 2-core CPU, by its load; writes ``benchmarks/results/gram_first.json``
and ``gram_first.png``); ``--quick`` for a one-minute smoke run (K = 2, 8, mgda
only, a smaller trunk, one process; results go to the temporary
directory's ``gram_first_quick.json``, not the committed files, unless
``--out STEM``). On a GPU or TPU: the same command (``--out`` to keep the
CPU figures); JAX picks the default backend, the memory figures are then
device memory, the resident figures host memory only.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

RESULTS = pathlib.Path(__file__).parent / "results"
KS = (2, 8, 32, 64)
METHODS = ("mgda", "upgrad", "cagrad")
# (path, chunk size): the stacked path vmaps its K backward passes (its
# default); the Gram-first path with all K gradients at once (None) and at
# its default, one at a time.
PATHS = (("stacked", None), ("gram_first", None), ("gram_first", 1))
BATCH, D_IN, D_HIDDEN = 16, 512, 2048
QUICK_D_IN, QUICK_D_HIDDEN = 256, 1024


def _read_status(field):
  try:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _reset_high_water_mark():
  try:
    pathlib.Path("/proc/self/clear_refs").write_text("5")
    return True
  except OSError:
    return False


def measure_one(path, num_tasks, method, chunk_size, d_in, d_hidden,
                repeats):
  """One configuration in this process; returns a dict of figures."""
  import jax
  import jax.numpy as jnp
  import optax
  import mtl_optax as mo

  def task_losses(params, x, y):
    t = params["trunk"]
    z = jnp.tanh(x @ t["w1"] + t["b1"])
    z = jnp.tanh(z @ t["w2"] + t["b2"])
    out = z @ params["heads"]["w"].T + params["heads"]["b"]   # (batch, K)
    return jnp.mean((out - y) ** 2, axis=0)

  k = jax.random.split(jax.random.key(0), 5)
  params = {
      "trunk": {"w1": jax.random.normal(k[0], (d_in, d_hidden)) / d_in**0.5,
                "b1": jnp.zeros(d_hidden),
                "w2": jax.random.normal(k[1], (d_hidden, d_hidden))
                      / d_hidden**0.5,
                "b2": jnp.zeros(d_hidden)},
      "heads": {"w": jax.random.normal(k[2], (num_tasks, d_hidden))
                     / d_hidden**0.5,
                "b": jnp.zeros(num_tasks)}}
  x = jax.random.normal(k[3], (BATCH, d_in))
  y = jax.random.normal(k[4], (BATCH, num_tasks))
  shared = {"trunk": True, "heads": False}
  labels = mo.label_by_path({"trunk": "shared", "heads": "head"})
  tx = optax.chain(optax.partition(
      {"shared": getattr(mo, method)(num_tasks),
       "head": mo.task_sum(num_tasks)}, labels), optax.sgd(1e-2))

  if path == "stacked":
    def step(params, opt_state, x, y):
      losses, grads = mo.value_and_task_grads(
          task_losses, shared=shared, chunk_size=chunk_size)(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     task_losses=losses)
      return optax.apply_updates(params, updates), opt_state, losses
  else:
    def step(params, opt_state, x, y):
      (losses, gram), grads = mo.value_and_gram_weighted_grad(
          task_losses, tx, shared=shared, chunk_size=chunk_size)(
              opt_state, params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params,
                                     task_losses=losses, gram=gram)
      return optax.apply_updates(params, updates), opt_state, losses

  opt_state = tx.init(params)
  start = time.perf_counter()
  compiled = jax.jit(step).lower(params, opt_state, x, y).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  rss_before = _read_status("VmRSS")
  # From here the high-water mark is the step's: compilation is done.
  reset = repeats > 0 and _reset_high_water_mark()
  times, finite = [], None
  for _ in range(repeats + 1 if repeats else 0):   # the first is a warm-up
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(params, opt_state, x, y))
    times.append(time.perf_counter() - start)
    finite = bool(jnp.all(jnp.isfinite(out[2])) and all(
        jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(out[0])))
  hwm = _read_status("VmHWM")
  shared_params = sum(v.size for v in jax.tree.leaves(params["trunk"]))
  return {
      "path": path, "K": num_tasks, "method": method,
      "chunk_size": chunk_size, "shared_params": int(shared_params),
      "head_params": int(sum(v.size for v in jax.tree.leaves(
          params["heads"]))),
      "argument_bytes": int(mem.argument_size_in_bytes),
      "output_bytes": int(mem.output_size_in_bytes),
      "temp_bytes": int(mem.temp_size_in_bytes),
      "alias_bytes": int(mem.alias_size_in_bytes),
      "peak_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                        + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      "step_rss_bytes": (hwm - rss_before
                         if reset and hwm is not None and rss_before
                         else None),
      "rss_after_compile_bytes": rss_before,
      "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                         * (1 if sys.platform == "darwin" else 1024),
      "compile_s": compile_s, "warmup_s": times[0] if times else None,
      "times_s": times[1:],
      "median_s": statistics.median(times[1:]) if times else None,
      "finite": finite,
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
  }


def _run_child(configs, d_in, d_hidden, repeats):
  """Measures ``configs`` (a list) in one fresh subprocess, in order."""
  cmd = [sys.executable, __file__, "--child", json.dumps(configs),
         "--d-in", str(d_in), "--d-hidden", str(d_hidden),
         "--repeats", str(repeats)]
  # The child imports mtl_optax from the checkout this script lives in.
  root = str(pathlib.Path(__file__).resolve().parents[1])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                        env=env)
  if proc.returncode != 0:
    return [dict(c, error=proc.stderr[-2000:]) for c in configs]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _configs(quick):
  """(path, chunk size, method, K, timed): mgda at every K on all three
  paths; the other methods at K = 2, 8, 64 on the stacked path and the
  Gram-first default (chunk_size=1), timed at K = 8 (the time target). The
  Gram-first path with all K at once is run up to K = 8 and only compiled
  beyond, to keep the total time down."""
  if quick:
    return [(path, chunk, "mgda", k, True) for k in (2, 8)
            for path, chunk in PATHS if chunk == 1 or path == "stacked"]
  configs = []
  for k in KS:
    for path, chunk in PATHS:
      configs.append((path, chunk, "mgda", k, chunk is not None or k <= 8
                      or path == "stacked"))
  for method in METHODS[1:]:
    for k in (2, 8, 64):
      for path, chunk in PATHS:
        if chunk is None and path == "gram_first":
          continue
        configs.append((path, chunk, method, k, k == 8))
  # The stacked path at its own fastest CPU setting (one backward pass at a
  # time, ``value_and_task_grads(chunk_size=1)``): still K gradients stacked.
  configs += [("stacked", 1, "mgda", k, k == 8) for k in (2, 8, 64)]
  return configs


def _repeats(num_tasks, quick):
  if quick:
    return 2
  return 5 if num_tasks <= 8 else 2


def _print_row(r):
  head = f"K={r['K']:3d} {r['method']:7s} {r['path']:10s} " \
         f"chunk={r['chunk_size']!s:4s}"
  if "error" in r:
    print(f"{head} ERROR {r['error'][-300:]}", flush=True)
    return
  rss, med = r["step_rss_bytes"], r["median_s"]
  print(f"{head} peak {r['peak_bytes'] / 2**20:8.1f} MiB  temp "
        f"{r['temp_bytes'] / 2**20:8.1f} MiB  step RSS "
        f"{'-' if rss is None else f'{rss / 2**20:.1f}':>8s} MiB  "
        f"{'-' if med is None else f'{med * 1e3:.1f}':>8s} ms", flush=True)


def _key(r):
  return (r["path"], r["chunk_size"], r["method"])


def _summary(results):
  ok = [r for r in results if "error" not in r]
  by = {(_key(r), r["K"]): r for r in ok}
  summary = {}
  for path, chunk in PATHS + (("stacked", 1),):
    for method in METHODS:
      key = (path, chunk, method)
      small, large = by.get((key, 2)), by.get((key, 64))
      if small and large:
        summary[f"{path}[chunk={chunk}]/{method}/peak_K64_over_K2"] = (
            large["peak_bytes"] / small["peak_bytes"])
        summary[f"{path}[chunk={chunk}]/{method}/temp_K64_over_K2"] = (
            large["temp_bytes"] / max(small["temp_bytes"], 1))
      gram = by.get((key, 8))
      for stacked_chunk in (None, 1):
        stacked = by.get((("stacked", stacked_chunk, method), 8))
        if (path == "gram_first" and stacked and gram
            and gram["median_s"] and stacked["median_s"]):
          summary[f"{path}[chunk={chunk}]/{method}/time_K8_over_stacked"
                  f"[chunk={stacked_chunk}]"] = (
                      gram["median_s"] / stacked["median_s"])
  return summary


def _plot(results, out_png):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ok = [r for r in results if "error" not in r]
  fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
  styles = {"mgda": "-o", "upgrad": "--s", "cagrad": ":^"}
  colors = {("stacked", None): "C3", ("stacked", 1): "C1",
            ("gram_first", None): "C0", ("gram_first", 1): "C2"}
  for path, chunk in PATHS + (("stacked", 1),):
    for method in METHODS:
      rows = sorted((r for r in ok if _key(r) == (path, chunk, method)),
                    key=lambda r: r["K"])
      if not rows:
        continue
      ks = [r["K"] for r in rows]
      name = ("stacked" + ("" if chunk is None else f", chunk_size={chunk}")
              if path == "stacked" else (
          "Gram-first, all K at once" if chunk is None
          else f"Gram-first, chunk_size={chunk}"))
      label = f"{name} ({method})"
      ax_mem.plot(ks, [r["peak_bytes"] / 2**20 for r in rows],
                  styles[method], color=colors[(path, chunk)], label=label,
                  markersize=4)
      timed = [r for r in rows if r["median_s"] is not None]
      ax_time.plot([r["K"] for r in timed],
                   [r["median_s"] * 1e3 for r in timed],
                   styles[method], color=colors[(path, chunk)],
                   markersize=4)
  for ax, title, unit in ((ax_mem, "peak memory of the compiled step", "MiB"),
                          (ax_time, "time per step (median)", "ms")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(KS, [str(k) for k in KS])
    ax.set_xlabel("K (tasks)")
    ax.set_ylabel(unit)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
  ax_mem.legend(fontsize=6)
  if ok:
    fig.suptitle(f"{ok[0]['shared_params'] / 1e6:.2f}M shared parameters, "
                 f"{ok[0]['backend']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(out_png, dpi=80)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="one-minute smoke run")
  parser.add_argument("--out", default=None,
                      help="output stem (default results/gram_first)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--d-in", type=int, default=D_IN)
  parser.add_argument("--d-hidden", type=int, default=D_HIDDEN)
  parser.add_argument("--repeats", type=int, default=None)
  args = parser.parse_args()
  if args.child:
    print(json.dumps([measure_one(
        c["path"], c["K"], c["method"], c["chunk_size"], args.d_in,
        args.d_hidden, args.repeats) for c in json.loads(args.child)]))
    return

  d_in, d_hidden = ((QUICK_D_IN, QUICK_D_HIDDEN) if args.quick
                     else (args.d_in, args.d_hidden))
  stem = pathlib.Path(args.out) if args.out else (
      pathlib.Path(tempfile.gettempdir()) / "gram_first_quick" if args.quick
      else RESULTS / "gram_first")
  load_before = os.getloadavg()
  start = time.perf_counter()
  results = []
  configs = [{"path": path, "K": k, "method": method, "chunk_size": chunk,
              "timed": timed}
             for path, chunk, method, k, timed in _configs(args.quick)]
  # Each timed configuration in its own process (its resident memory is its
  # own); the compile-only ones together (their figures are XLA's).
  # (--quick: everything in one process, one import.)
  batches = ([configs] if args.quick else
             [[c] for c in configs if c["timed"]]
             + [[c for c in configs if not c["timed"]]])
  for batch in batches:
    if not batch:
      continue
    timed = batch[0]["timed"]
    repeats = ((args.repeats or _repeats(batch[0]["K"], args.quick))
               if timed else 0)
    for r in _run_child(batch, d_in, d_hidden, repeats):
      results.append(r)
      _print_row(r)
  summary = _summary(results)
  default = "gram_first[chunk=1]"
  targets = {
      "gram_first_peak_K64_over_K2_at_most_1.5": {
          m: summary.get(f"{default}/{m}/peak_K64_over_K2") for m in METHODS},
      "gram_first_time_K8_over_stacked_at_most_2.5": {
          m: summary.get(f"{default}/{m}/time_K8_over_stacked[chunk=None]")
          for m in METHODS}}
  bounds = {"gram_first_peak_K64_over_K2_at_most_1.5": 1.5,
            "gram_first_time_K8_over_stacked_at_most_2.5": 2.5}
  values = [(v, bounds[name]) for name in bounds
            for v in targets[name].values()]
  # None: a figure is missing (--quick has no K = 64 and one method).
  targets["met"] = (None if any(v is None for v, _ in values)
                    else all(v <= bound for v, bound in values))
  out = {
      "command": "python benchmarks/bench_gram_first.py"
                 + (" --quick" if args.quick else ""),
      "model": {"batch": BATCH, "d_in": d_in, "d_hidden": d_hidden,
                "trunk": "x -> tanh(x W1 + b1) -> tanh(. W2 + b2)",
                "heads": "K linear heads d_hidden -> 1, squared error"},
      "peak_definition": "argument + output + temp - alias bytes of "
                         "compiled.memory_analysis() (no donation)",
      "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
      "cpu_count": os.cpu_count(),
      "note": "memory figures are properties of the compiled program and do "
              "not depend on the machine's load; times do (shared machine)",
      "wall_s": time.perf_counter() - start,
      "targets": targets, "summary": summary, "results": results,
  }
  stem.parent.mkdir(parents=True, exist_ok=True)
  stem.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
  _plot(results, stem.with_suffix(".png"))
  for name, value in summary.items():
    print(f"{name}: {value:.2f}")
  print(f"targets met: {targets['met']}")
  print(f"wrote {stem.with_suffix('.json')} and .png in "
        f"{out['wall_s']:.0f} s")


if __name__ == "__main__":
  main()
