"""Micro-benchmark: formulations of the K x K Gram matrix ``J J^T`` on CPU.

The Gram pass is the one parameter-sized read every Gram-based method makes,
so its XLA:CPU code decides how fast aggregation is at large P. This script
times, on the same seeded ``(K, P)`` float32 array:

* ``library``       -- ``mtl_optax._src.tree_math.gram_matrix``, which picks
  ``pairwise`` for K <= 3 and ``scan_auto`` for long leaves on one CPU device;
* ``dot_general``   -- the plain contraction (the library's choice elsewhere;
  contract axis 1 with axis 1, ``preferred_element_type=float32``,
  ``precision=HIGHEST``);
* ``dot_default``   -- the same with default precision and no preferred type;
* ``einsum``        -- ``jnp.einsum('kp,jp->kj')``;
* ``transposed``    -- ``J^T`` materialised as ``(P, K)``, then ``X^T X``;
* ``blocked_B``     -- P split into B-sized blocks: a batched ``(n, K, B)``
  product summed over blocks (plus a remainder), B in {4096, 16384, 65536};
* ``scan_B``        -- the same blocks accumulated in a ``lax.fori_loop``,
  B in {16384, 65536, 262144}, and ``scan_auto`` with B = 2**19 // K
  (about 2 MiB of float32 per block);
* ``pairwise``      -- one unrolled multiply-and-sum reduction per pair of
  rows of the upper triangle (K <= 10);
* ``symmetric``     -- only the K(K+1)/2 products of the upper triangle, as
  multiply-and-reduce;
* ``torch_mm``      -- ``J @ J.T`` in PyTorch (MKL / OpenBLAS sgemm), for
  reference, when torch is installed.

It then times the other parameter-sized pass, the weighted sum
``sum_i w_i g_i`` (``tree_math.weighted_task_sum``): ``tensordot`` at
HIGHEST precision (today), a broadcast multiply-and-sum, a default-precision
``dot_general``, a Python-unrolled sum over K, a blocked ``lax.map``, and a
jitted no-op (``identity_floor``: dispatch and output allocation only), with
torch's ``tensordot`` and ``mean`` for reference.

Last, reductions over the leading (task) axis, ``jnp.sum(g, 0)`` and
``jnp.max(g, 0)``, which GradDrop and TrimmedMean use, against the same sum
as a ``dot_general`` with ones and an unrolled ``maximum`` over K.

Run it a second time with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=``
(XLA:CPU's YNNPACK fusions off) to see how much of each gap is that fusion.

Timings are medians of interleaved repeats (every formulation is called once
per round, round after round), so that load from other processes on the
machine hits every formulation alike. Writes
``benchmarks/results/compare_torchjd_micro_gram.json``.

    python benchmarks/micro_gram.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def cpu_model() -> str:
  """The CPU's model name: which formulation of the Gram is fastest depends
  on it, so every figure records it."""
  info = "/proc/cpuinfo"
  names = ([line.split(":", 1)[1].strip() for line in open(info)
            if line.startswith("model name")] if os.path.exists(info) else [])
  return names[0] if names else platform.machine()


def dot_general(j):
  return jax.lax.dot_general(j, j, (((1,), (1,)), ((), ())),
                             precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


def dot_default(j):
  return jax.lax.dot_general(j, j, (((1,), (1,)), ((), ())))


def einsum(j):
  return jnp.einsum("kp,jp->kj", j, j, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)


def transposed(j):
  x = j.T
  return jax.lax.dot_general(x, x, (((0,), (0,)), ((), ())),
                             precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


def blocked(block):
  def fn(j):
    k, p = j.shape
    n = p // block
    head = j[:, :n * block].reshape(k, n, block)
    out = jax.lax.dot_general(head, head, (((2,), (2,)), ((1,), (1,))),
                              precision=_HIGHEST,
                              preferred_element_type=jnp.float32).sum(0)
    if n * block < p:
      out = out + dot_general(j[:, n * block:])
    return out
  return fn


def blocked_scan(block):
  def fn(j):
    k, p = j.shape
    n = p // block
    if n == 0:
      return dot_general(j)

    def body(i, acc):
      part = jax.lax.dynamic_slice_in_dim(j, i * block, block, axis=1)
      return acc + dot_general(part)

    out = jax.lax.fori_loop(0, n, body, jnp.zeros((k, k), jnp.float32))
    if n * block < p:
      out = out + dot_general(j[:, n * block:])
    return out
  return fn


def auto_block(num_tasks):
  """About 2**19 elements (2 MiB of float32) per block: K * B ~ 512k."""
  return max(4096, (2 ** 19 // num_tasks) // 1024 * 1024)


def symmetric(j):
  k = j.shape[0]
  rows, cols = np.triu_indices(k)
  vals = jnp.sum(j[rows] * j[cols], axis=1, dtype=jnp.float32)
  out = jnp.zeros((k, k), jnp.float32).at[rows, cols].set(vals)
  return out + jnp.triu(out, 1).T


def pairwise(j):
  k = j.shape[0]
  entries = {}
  for a in range(k):
    for b in range(a, k):
      entries[a, b] = entries[b, a] = jnp.sum(j[a] * j[b], dtype=jnp.float32)
  return jnp.stack([jnp.stack([entries[a, b] for b in range(k)])
                    for a in range(k)])


def library(j):
  from mtl_optax._src import tree_math  # pylint: disable=import-outside-toplevel
  return tree_math.gram_matrix(j)


def formulations(num_tasks):
  out = {
      "library": library,
      "dot_general": dot_general,
      "dot_default": dot_default,
      "einsum": einsum,
      "transposed": transposed,
      "blocked_4096": blocked(4096),
      "blocked_16384": blocked(16384),
      "blocked_65536": blocked(65536),
      "scan_16384": blocked_scan(16384),
      "scan_65536": blocked_scan(65536),
      "scan_262144": blocked_scan(262144),
      "scan_auto": blocked_scan(auto_block(num_tasks)),
  }
  if num_tasks <= 10:  # K(K+1)/2 full passes: hopeless beyond small K
    out["symmetric"] = symmetric
    out["pairwise"] = pairwise
  return out


# --- the other parameter-sized pass: the weighted sum of task gradients ----

def wsum_tensordot(w, j):
  """What ``tree_math.weighted_task_sum`` does today."""
  return jnp.tensordot(w, j, axes=1, precision=_HIGHEST)


def wsum_broadcast(w, j):
  return jnp.sum(w[:, None] * j, axis=0)


def wsum_dot_default(w, j):
  return jax.lax.dot_general(w, j, (((0,), (0,)), ((), ())))


def wsum_unrolled(w, j):
  out = w[0] * j[0]
  for i in range(1, j.shape[0]):
    out = out + w[i] * j[i]
  return out


def wsum_scan(block):
  def fn(w, j):
    k, p = j.shape
    n = p // block
    if n == 0:
      return wsum_tensordot(w, j)
    head = j[:, :n * block].reshape(k, n, block)
    out = jax.lax.map(lambda i: jnp.tensordot(
        w, jax.lax.dynamic_index_in_dim(head, i, 1, keepdims=False), axes=1,
        precision=_HIGHEST), jnp.arange(n)).reshape(-1)
    if n * block < p:
      out = jnp.concatenate([out, wsum_tensordot(w, j[:, n * block:])])
    return out
  return fn


def wsum_formulations():
  return {"tensordot": wsum_tensordot, "broadcast_sum": wsum_broadcast,
          "dot_default": wsum_dot_default, "unrolled": wsum_unrolled,
          "scan_65536": wsum_scan(65536),
          "identity_floor": lambda w, j: j[0]}


def _interleaved_medians(fns, repeats):
  for fn in fns.values():
    fn()  # warm-up (compilation, allocation)
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results", "compare_torchjd_micro_gram.json"))
  args = parser.parse_args()
  repeats = 5 if args.quick else 15
  try:
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch = None
  rows = []
  print(f"jax {jax.__version__}, {cpu_model()}, {os.cpu_count()} "
        f"cores; load average {os.getloadavg()[0]:.1f}")
  for size_p in (100_000, 1_000_000):
    for num_tasks in (2, 10, 40):
      rng = np.random.default_rng(num_tasks)
      host = rng.standard_normal((num_tasks, size_p), dtype=np.float32)
      j = jnp.asarray(host)
      ref = host.astype(np.float64) @ host.T.astype(np.float64)
      fns = {}
      for name, f in formulations(num_tasks).items():
        jf = jax.jit(f)
        err = float(np.max(np.abs(np.asarray(jf(j), np.float64) - ref))
                    / np.max(np.abs(ref)))
        fns[name] = (lambda jf=jf: jf(j).block_until_ready(), err)
      if torch is not None:
        t = torch.from_numpy(host)
        fns["torch_mm"] = (lambda t=t: t @ t.T, float(np.max(np.abs(
            (t @ t.T).double().numpy() - ref)) / np.max(np.abs(ref))))
      med = _interleaved_medians({k: v[0] for k, v in fns.items()}, repeats)
      base = med["dot_general"]
      row = {"K": num_tasks, "P": size_p,
             "ms": {k: 1e3 * v for k, v in med.items()},
             "rel_err": {k: v[1] for k, v in fns.items()}}
      rows.append(row)
      best = min((v, k) for k, v in med.items() if k != "torch_mm")
      print(f"K={num_tasks:3d} P={size_p:8d}  " + "  ".join(
          f"{k} {1e3 * v:.2f}" for k, v in med.items())
          + f"   | best jax: {best[1]} ({base / best[0]:.2f}x vs dot_general)")
  wrows = []
  print("weighted sum sum_i w_i g_i (ms):")
  for size_p in (100_000, 1_000_000):
    for num_tasks in (2, 10, 40):
      rng = np.random.default_rng(num_tasks)
      host = rng.standard_normal((num_tasks, size_p), dtype=np.float32)
      j = jnp.asarray(host)
      w = jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)
      fns = {}
      for name, f in wsum_formulations().items():
        jf = jax.jit(f)
        fns[name] = lambda jf=jf: jf(w, j).block_until_ready()
      if torch is not None:
        t = torch.from_numpy(host)
        tw = torch.full((num_tasks,), 1.0 / num_tasks)
        fns["torch_tensordot"] = lambda t=t, tw=tw: torch.tensordot(tw, t, 1)
        fns["torch_mean"] = lambda t=t: t.mean(dim=0)
      med = _interleaved_medians(fns, 3 * repeats)
      wrows.append({"K": num_tasks, "P": size_p,
                    "ms": {k: 1e3 * v for k, v in med.items()}})
      print(f"K={num_tasks:3d} P={size_p:8d}  " + "  ".join(
          f"{k} {1e3 * v:.3f}" for k, v in med.items()))
  rrows = []
  print("reductions over the task axis (ms):")
  for size_p in (100_000, 1_000_000):
    for num_tasks in (2, 10, 40):
      rng = np.random.default_rng(num_tasks)
      j = jnp.asarray(rng.standard_normal((num_tasks, size_p),
                                          dtype=np.float32))
      fns = {}
      for name, f in {
          "sum_axis0": lambda g: jnp.sum(g, axis=0),
          "sum_as_dot": lambda g: jax.lax.dot_general(
              jnp.ones(g.shape[:1], g.dtype), g, (((0,), (0,)), ((), ()))),
          "max_axis0": lambda g: jnp.max(g, axis=0),
          "max_unrolled": lambda g: functools.reduce(
              jnp.maximum, [g[i] for i in range(g.shape[0])]),
      }.items():
        jf = jax.jit(f)
        fns[name] = lambda jf=jf, j=j: jf(j).block_until_ready()
      med = _interleaved_medians(fns, repeats)
      rrows.append({"K": num_tasks, "P": size_p,
                    "ms": {k: 1e3 * v for k, v in med.items()}})
      print(f"K={num_tasks:3d} P={size_p:8d}  " + "  ".join(
          f"{k} {1e3 * v:.3f}" for k, v in med.items()))
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"jax": jax.__version__, "cores": os.cpu_count(),
               "machine": platform.machine(), "cpu": cpu_model(),
               "repeats": repeats,
               "load_avg_end": os.getloadavg()[0],
               "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "gram": rows, "weighted_sum": wrows,
               "task_axis_reductions": rrows}, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
