"""A real multi-process training run, launched by tests/test_multiprocess.py.

Two processes on this machine are joined by ``jax.distributed.initialize``
(CPU collectives over gloo), each owning one CPU device. The parameters are
sharded across both processes (FSDP on the leading parameter axis), the batch
is split between them (data parallel), and a few training steps run with a
stacked Gram-based method (per-task gradients from
``mo.value_and_task_grads``, then ``mo.mgda``) and with the Gram-first path
(``mo.value_and_gram_weighted_grad``: the K x K Gram matrix, then one
backward pass of the weighted loss). Process 0 writes the final parameters of every run
to ``<out>/multi.npz``. Run with ``--single`` (no ``jax.distributed``), the
same program writes ``<out>/single.npz``: the test compares the two.

    python tests/multiprocess_check.py --single OUT
    python tests/multiprocess_check.py --process-id 0 --port 12355 OUT &
    python tests/multiprocess_check.py --process-id 1 --port 12355 OUT

On a cluster the same program needs no address: ``jax.distributed.initialize()``
reads the coordinator, process count and id from Slurm or the TPU runtime.
"""

from __future__ import annotations

import argparse
import os
import sys

NUM_TASKS = 3
NUM_STEPS = 3
BATCH = 16
WIDTH = 8


def _parse():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--single", action="store_true")
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--num-processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=12355)
  return parser.parse_args()


def _problem(np):
  """Parameters and a batch, identical in every process (fixed seed)."""
  rng = np.random.default_rng(0)
  params = {
      "trunk": {"kernel": rng.normal(size=(WIDTH, WIDTH)).astype(np.float32),
                "bias": np.zeros(WIDTH, np.float32)},
      "heads": rng.normal(size=(WIDTH, NUM_TASKS)).astype(np.float32),
  }
  x = rng.normal(size=(BATCH, WIDTH)).astype(np.float32)
  y = rng.normal(size=(BATCH, NUM_TASKS)).astype(np.float32)
  return params, (x, y)


def task_losses(params, batch):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  x, y = batch
  hidden = jnp.tanh(x @ params["trunk"]["kernel"] + params["trunk"]["bias"])
  return jnp.mean((hidden @ params["heads"] - y) ** 2, axis=0)   # (K,)


def _train_steps(mo, optax, jax):
  """``name -> step(params, opt_state, batch)`` for every path we check."""
  tx = optax.chain(mo.mgda(NUM_TASKS), optax.sgd(0.1))

  def stacked(params, opt_state, batch):
    losses, grads = mo.value_and_task_grads(task_losses)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses)
    return optax.apply_updates(params, updates), opt_state

  steps = {"stacked_mgda": (tx, stacked)}
  def gram_step(params, opt_state, batch):
    (losses, gram), grads = mo.value_and_gram_weighted_grad(task_losses, tx)(
        opt_state, params, batch)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses, gram=gram)
    return optax.apply_updates(params, updates), opt_state

  steps["gram_first_mgda"] = (tx, gram_step)
  return {name: (t, jax.jit(fn)) for name, (t, fn) in steps.items()}


def main():
  args = _parse()
  import jax  # pylint: disable=import-outside-toplevel
  if not args.single:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}",
                               num_processes=args.num_processes,
                               process_id=args.process_id)
  import numpy as np  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  import mtl_optax as mo  # pylint: disable=import-outside-toplevel

  params_host, (x, y) = _problem(np)
  # GSPMD ("Auto") axes: the partitioner places the collectives.
  mesh = jax.make_mesh((jax.device_count(),), ("fsdp",),
                       axis_types=(AxisType.Auto,))
  fsdp = NamedSharding(mesh, P("fsdp"))        # leading axis split

  def global_array(value):
    return jax.make_array_from_callback(value.shape, fsdp,
                                        lambda index: value[index])

  results = {}
  for name, (tx, step) in _train_steps(mo, optax, jax).items():
    params = jax.tree.map(global_array, params_host)
    batch = (global_array(x), global_array(y))   # each process holds its rows
    opt_state = tx.init(params)
    for _ in range(NUM_STEPS):
      params, opt_state = step(params, opt_state, batch)
    gathered = multihost_utils.process_allgather(params, tiled=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]:
      results[f"{name}{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
  if jax.process_index() == 0:
    os.makedirs(args.out, exist_ok=True)
    np.savez(os.path.join(args.out, "single.npz" if args.single
                          else "multi.npz"), **results)
  if not args.single:
    jax.distributed.shutdown()


if __name__ == "__main__":
  sys.exit(main())
