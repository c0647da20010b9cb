"""Sharded (SPMD) checks, run in a subprocess by tests/test_sharding.py.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before JAX
initialises, which the pytest process has already done, so the checks live
in this script, which sets the flag itself. It prints one JSON object (the
last line of stdout) that the test asserts on; run it by hand to see the
findings::

    python tests/sharding_check.py | tail -1 | python -m json.tool

Layouts (a mesh of 8 CPU devices):

* ``fsdp``: a 2 x 4 mesh ``('data', 'fsdp')`` in GSPMD ("Auto") mode. Every
  parameter leaf is split along its leading parameter axis over ``'fsdp'``
  (replicated over ``'data'``: hybrid FSDP); the batch is split over all 8
  devices (data parallel). The stacked per-task gradients ``(K, *shape)`` keep
  the parameter's sharding with the task axis replicated.
* ``fsdp_trailing``: the same, but leaves split along their LAST axis (the
  output features of a kernel), a common FSDP / tensor-parallel layout.
* ``explicit``: the ``fsdp_trailing`` layout on a mesh with explicit axes
  (``jax.make_mesh``'s default since JAX 0.7: shardings are part of the
  types), inside ``jax.set_mesh``.

For each layout: per-task gradients from ``mo.value_and_task_grads`` and the
update of every available method are compared with the same computation on
one device, and the collectives of the compiled method (``tx.update`` on
sharded stacked gradients) and of a full jitted training step are listed from
``jax.jit(...).lower(...).compile().as_text()``.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import traceback

if __name__ == "__main__":
  # The device count is read once, when JAX initialises. (Imported as a
  # module, e.g. by pytest's doctest collection, this file does nothing.)
  if "jax" in sys.modules:  # pragma: no cover
    raise RuntimeError("sharding_check.py must start before JAX is imported.")
  # Eight CPU devices; LLVM's expensive passes off: the check compiles ~40
  # small programs, and compilation, not running them, is its cost.
  os.environ["XLA_FLAGS"] = (
      "--xla_force_host_platform_device_count=8 "
      "--xla_backend_optimization_level=0 "
      "--xla_llvm_disable_expensive_passes=true " +
      os.environ.get("XLA_FLAGS", ""))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from jax.sharding import AxisType  # pylint: disable=wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=wrong-import-position

import mtl_optax as mo  # pylint: disable=wrong-import-position

NUM_TASKS = 3
BATCH = 64
WIDTHS = (16, 64, 32)

# Every stacked-gradient method of the library, by public name, with its
# factory's keyword arguments, in three groups compiled as one program each:
# the Gram-based methods (one K x K Gram pass, then a weighted sum), the
# coordinate-wise ones, and the fixed weightings.
GROUPS = {
    "gram": {"mgda": {}, "cagrad": {"c": 0.4}, "pcgrad": {}, "upgrad": {},
             "dualproj": {}, "imtl_g": {}, "aligned_mtl": {}, "config": {},
             "nash_mtl": {}, "fairgrad": {}, "gradvac": {}, "krum": {}},
    "coordinatewise": {"graddrop": {}, "trimmed_mean": {}},
    "fixed": {"linear_scalarization": {}, "random_weighting": {}},
}
# On the extra layouts, a representative subset per group.
SUBSET = {"gram": ("mgda", "upgrad"),
          "coordinatewise": ("graddrop", "trimmed_mean")}

_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter"
    r"|all-to-all|collective-permute|collective-broadcast)(?:-start)?\(")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo_text):
  """``[(op, [(dtype, dims), ...]), ...]`` for every collective in the HLO."""
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if m:
      shapes = [(dt, [int(d) for d in dims.split(",") if d])
                for dt, dims in _SHAPE.findall(m.group(1))]
      found.append((m.group(2), shapes))
  return found


def init_params(key):
  keys = jax.random.split(key, len(WIDTHS))
  params = {}
  for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
    params[f"layer{i}"] = {
        "kernel": jax.random.normal(keys[i], (a, b)) / np.sqrt(a),
        "bias": 0.1 * jax.random.normal(keys[i + 1], (b,))}
  params["heads"] = jax.random.normal(
      keys[-1], (WIDTHS[-1], NUM_TASKS)) / np.sqrt(WIDTHS[-1])
  return params


def _gather(x):
  """FSDP's all-gather of a parameter before use, under explicit sharding.

  With explicit mesh axes the sharding is part of the type and a matmul of a
  batch-sharded activation with a feature-sharded kernel is rejected, so the
  model gathers each parameter (the backward pass reduce-scatters its
  gradient). Under GSPMD ("Auto") the compiler chooses and this is a no-op.
  """
  aval = jax.typeof(x)
  mesh = aval.sharding.mesh
  if mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return x
  return jax.sharding.reshard(x, P())


def task_losses(params, batch):
  h = batch["x"]
  for i in range(len(WIDTHS) - 1):
    layer = params[f"layer{i}"]
    h = jnp.tanh(h @ _gather(layer["kernel"]) + _gather(layer["bias"]))
  pred = h @ _gather(params["heads"])
  # Conflicting targets: task 1 wants the negation of task 0.
  return jnp.mean((pred - batch["y"]) ** 2, axis=0)


def make_batch(key):
  kx, ky = jax.random.split(key)
  x = jax.random.normal(kx, (BATCH, WIDTHS[0]))
  y = jax.random.normal(ky, (BATCH, NUM_TASKS))
  y = y.at[:, 1].set(-y[:, 0] + 0.1 * y[:, 1])
  return {"x": x, "y": y}


def layout(kind):
  explicit = kind == "explicit"
  mesh = jax.make_mesh(
      (2, 4), ("data", "fsdp"),
      axis_types=(AxisType.Explicit if explicit else AxisType.Auto,) * 2)
  trailing = kind in ("fsdp_trailing", "explicit")

  def param_spec(leaf):
    spec = [None] * leaf.ndim
    axis = leaf.ndim - 1 if trailing else 0
    if leaf.shape[axis] % 4 == 0:
      spec[axis] = "fsdp"
    elif leaf.shape[0] % 4 == 0:
      spec[0] = "fsdp"
    return P(*spec)

  return mesh, param_spec


def rel_err(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  scale = max(float(np.max(np.abs(b))), 1e-30)
  return float(np.max(np.abs(a - b)) / scale)


def tree_rel_err(a, b):
  return max(jax.tree.leaves(jax.tree.map(rel_err, a, b)) or [0.0])


def spec_names(tree):
  return jax.tree.leaves(jax.tree.map(
      lambda x: str(x.sharding.spec) if hasattr(x.sharding, "spec") else "?",
      tree))


def apply_all(txs, grads, states, params):
  """Every method's update and weights, in one program."""
  updates, weights = {}, {}
  for name, tx in txs.items():
    updates[name], state = tx.update(grads, states[name], params)
    weights[name] = state.weights
  return updates, weights


def run_layout(kind, params, batch, single, groups):
  mesh, param_spec = layout(kind)
  pspecs = jax.tree.map(param_spec, params)
  psh = jax.tree.map(lambda s: NamedSharding(mesh, s), pspecs)
  gsh = jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s)), pspecs)
  bsh = {"x": NamedSharding(mesh, P(("data", "fsdp"), None)),
         "y": NamedSharding(mesh, P(("data", "fsdp"), None))}
  out = {"mesh": dict(mesh.shape), "param_specs": spec_names(
      jax.tree.map(lambda s, x: jax.device_put(x, NamedSharding(mesh, s)),
                   pspecs, params)), "groups": {}}
  with jax.set_mesh(mesh):
    sparams = jax.device_put(params, psh)
    sbatch = jax.device_put(batch, bsh)

    # Per-task gradients, sharded like the parameters.
    try:
      grad_fn = jax.jit(mo.value_and_task_grads(task_losses),
                        out_shardings=(NamedSharding(mesh, P()), gsh))
      losses, grads = grad_fn(sparams, sbatch)
      out["losses_err"] = rel_err(losses, single["losses"])
      out["grads_err"] = tree_rel_err(grads, single["grads"])
      out["grads_specs"] = spec_names(grads)
    except Exception as exc:  # pylint: disable=broad-except
      out["grads_error"] = f"{type(exc).__name__}: {exc}"[:400]
      grads = jax.device_put(single["grads"], gsh)

    for group, methods in groups.items():
      entry = {"methods": sorted(methods)}
      try:
        txs = {name: getattr(mo, name)(NUM_TASKS, **kwargs)
               for name, kwargs in methods.items()}
        states = {name: tx.init(params) for name, tx in txs.items()}
        update = jax.jit(
            lambda g, s, p, txs=txs: apply_all(txs, g, s, p),
            out_shardings=({name: psh for name in txs}, None))
        t0 = time.perf_counter()
        compiled = update.lower(grads, states, sparams).compile()
        entry["compile_s"] = time.perf_counter() - t0
        entry["collectives"] = collectives(compiled.as_text())
        new_updates, new_weights = compiled(grads, states, sparams)
        ref_updates, ref_weights = single["groups"][group]
        entry["update_err"] = {
            name: tree_rel_err(new_updates[name], ref_updates[name])
            for name in txs}
        entry["weights_err"] = {
            name: rel_err(new_weights[name], ref_weights[name])
            for name in txs}
        entry["update_specs"] = sorted(set(spec_names(new_updates)))
      except Exception as exc:  # pylint: disable=broad-except
        entry["error"] = f"{type(exc).__name__}: {exc}"[:400]
      out["groups"][group] = entry

    # A full training step, its per-task gradients pinned to the layout:
    # the K backward passes vmapped (chunk_size=None, the default on
    # accelerators) and one task at a time (the default on a CPU).
    for key, chunk_size in (("train_step", None), ("train_step_chunked", 1)):
      try:
        step, _ = make_step(gsh, chunk_size=chunk_size)
        opt_state = step.tx.init(params)
        jstep = jax.jit(step, out_shardings=(psh, None, None))
        compiled = jstep.lower(sparams, opt_state, sbatch).compile()
        entry = {"collectives": collectives(compiled.as_text())}
        new_params, _, _ = compiled(sparams, opt_state, sbatch)
        delta = lambda a, b: (np.asarray(a, np.float64)
                              - np.asarray(b, np.float64))
        entry["params_err"] = tree_rel_err(
            jax.tree.map(delta, new_params, params),
            jax.tree.map(delta, single["step_params"], params))
        out[key] = entry
      except Exception as exc:  # pylint: disable=broad-except
        out[key] = {"error": f"{type(exc).__name__}: {exc}"[:400]}
  return out


def make_step(grad_shardings=None, chunk_size=None):
  """A training step: per-task grads, UPGrad on the trunk, adam.

  ``grad_shardings`` (a tree of shardings for the stacked gradients) pins the
  per-task gradients to the parameters' layout with the task axis replicated
  (``jax.lax.with_sharding_constraint``), so that GSPMD does not pick another
  layout for them; the recommended pattern. ``chunk_size`` is passed to
  ``value_and_task_grads`` (1: one backward pass per task, in a loop).
  """
  labels = {k: jax.tree.map(lambda _: "heads" if k == "heads" else "trunk", v)
            for k, v in init_params(jax.random.PRNGKey(0)).items()}
  tx = optax.chain(
      optax.partition({"trunk": mo.upgrad(NUM_TASKS),
                       "heads": mo.task_sum(NUM_TASKS)}, labels),
      optax.adam(1e-2))

  def step(params, opt_state, batch):
    losses, grads = mo.value_and_task_grads(
        task_losses, chunk_size=chunk_size)(params, batch)
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    updates, opt_state = tx.update(grads, opt_state, params,
                                   task_losses=losses)
    return optax.apply_updates(params, updates), opt_state, losses

  step.tx = tx
  return step, tx


def single_device(params, batch, groups):
  dev = jax.devices()[0]
  params = jax.device_put(params, dev)
  batch = jax.device_put(batch, dev)
  losses, grads = jax.jit(mo.value_and_task_grads(task_losses))(params, batch)
  out = {"losses": losses, "grads": grads, "groups": {}}
  for group, methods in groups.items():
    txs = {name: getattr(mo, name)(NUM_TASKS, **kwargs)
           for name, kwargs in methods.items()}
    states = {name: tx.init(params) for name, tx in txs.items()}
    out["groups"][group] = jax.jit(
        lambda g, s, p, txs=txs: apply_all(txs, g, s, p))(grads, states,
                                                          params)
  step, _ = make_step()
  out["step_params"], _, _ = jax.jit(step)(params, step.tx.init(params), batch)
  return out


def main():
  t0 = time.perf_counter()
  report = {"devices": jax.device_count(), "jax": jax.__version__,
            "num_tasks": NUM_TASKS, "skipped_methods": [], "layouts": {}}
  groups = {}
  for group, methods in GROUPS.items():
    groups[group] = {}
    for name, kwargs in methods.items():
      if hasattr(mo, name):
        groups[group][name] = kwargs
      else:
        report["skipped_methods"].append(name)
  groups = {g: m for g, m in groups.items() if m}
  params = init_params(jax.random.PRNGKey(0))
  batch = make_batch(jax.random.PRNGKey(1))
  single = single_device(params, batch, groups)
  report["single_device_s"] = time.perf_counter() - t0
  for kind in ("fsdp", "fsdp_trailing", "explicit"):
    if kind == "fsdp":
      subset = groups
    else:
      subset = {g: {n: k for n, k in m.items() if n in SUBSET.get(g, ())}
                for g, m in groups.items()}
      subset = {g: m for g, m in subset.items() if m}
    t1 = time.perf_counter()
    try:
      report["layouts"][kind] = run_layout(kind, params, batch, single,
                                           subset)
    except Exception:  # pylint: disable=broad-except
      report["layouts"][kind] = {"error": traceback.format_exc()[-600:]}
    report["layouts"][kind]["wall_s"] = time.perf_counter() - t1
  report["wall_s"] = time.perf_counter() - t0
  print(json.dumps(report))


if __name__ == "__main__":
  main()
