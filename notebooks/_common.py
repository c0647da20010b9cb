"""Helpers shared by the notebooks (not library API).

Everything here is built on the public API (``import mtl_optax as mo``):
method tables, the CAGrad toy on the single-backward path, the Multi-digits
data set built from scikit-learn's bundled ``load_digits`` (no download), a
small Flax NNX model with a shared trunk and one head per task, and a
functional trainer that ``vmap``s over seeds and ``lax.scan``s over steps.

``QUICK`` (environment variable ``MTL_OPTAX_QUICK=1``) selects tiny runs: the
test suite executes every notebook that way.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mtl_optax as mo
from mtl_optax import toy

QUICK = os.environ.get("MTL_OPTAX_QUICK", "").strip() not in ("", "0")


def pick(full, quick):
  """``full`` normally, ``quick`` under ``MTL_OPTAX_QUICK=1``."""
  return quick if QUICK else full


class Timer:
  """``with Timer() as t: ...``; ``t.seconds`` afterwards."""

  def __enter__(self):
    self.start = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


def _fmt(value, floatfmt):
  if isinstance(value, (float, np.floating)):
    if not np.isfinite(value):
      return str(value)
    return format(float(value), floatfmt)
  return str(value)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
             floatfmt: str = ".3f") -> str:
  """A Markdown table (``IPython.display.Markdown`` renders it)."""
  lines = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in row) + " |")
  return "\n".join(lines)


def show_table(headers, rows, floatfmt=".3f"):
  from IPython.display import Markdown, display  # pylint: disable=g-import-not-at-top
  display(Markdown(md_table(headers, rows, floatfmt)))


# ---------------------------------------------------------------------------
# Method tables.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
  """A named method of the library and how to feed it.

  Attributes:
    name: display name.
    make: ``num_tasks -> transformation``.
    single_backward: True for LossWeightingTransformations (one weighted-loss
      gradient, ``mo.value_and_weighted_grad``); False for stacked per-task
      gradients (``mo.value_and_task_grads``).
    uses_losses: whether the method reads ``task_losses`` (losses must then
      be positive: the toy shifts them).
    min_tasks: smallest K it accepts.
  """
  name: str
  make: Callable[[int], Any]
  single_backward: bool = False
  uses_losses: bool = False
  min_tasks: int = 2


def stacked_methods(cagrad_cs: Sequence[float] = (0.4,)) -> list[Method]:
  """Every stacked-gradient method of the library with default settings."""
  out = [Method("LS (mean)", lambda k: mo.linear_scalarization(k)),
         Method("MGDA", lambda k: mo.mgda(k)),
         Method("PCGrad", lambda k: mo.pcgrad(k))]
  for c in cagrad_cs:
    out.append(Method(f"CAGrad c={c:g}", lambda k, c=c: mo.cagrad(k, c=c)))
  optional = [
      ("IMTL-G", "imtl_g", {}, False, 2),
      ("UPGrad", "upgrad", {}, False, 2),
      ("DualProj", "dualproj", {}, False, 2),
      ("Aligned-MTL", "aligned_mtl", {}, False, 2),
      ("ConFIG", "config", {}, False, 2),
      ("Nash-MTL", "nash_mtl", {}, False, 2),
      ("FairGrad", "fairgrad", {}, False, 2),
      ("GradVac", "gradvac", {}, False, 2),
      ("GradDrop", "graddrop", {}, False, 2),
      ("ExcessMTL", "excess_mtl", {}, False, 2),
      ("SDMGrad", "sdmgrad", {}, False, 2),
      ("MoDo", "modo", {}, False, 2),
      ("MoCo", "moco", {}, True, 2),
      ("RW (stacked)", "random_weighting", {}, False, 2),
      ("DB-MTL", "db_mtl", {}, True, 2),
      ("Krum", "krum", {}, False, 3),
      ("Trimmed mean", "trimmed_mean", {}, False, 3),
      ("M-ConFIG (direction)", "momentum_config", {"normalize": False}, False,
       2),
      ("PSMGD (R=4)", "psmgd", {"update_every": 4}, False, 2),
      ("PCD (left digit primary)", "pcd", {}, False, 2),
      ("Auto-Lambda", "auto_lambda", {"virtual_lr": 1e-3}, True, 2),
  ]
  for name, attr, kwargs, uses_losses, min_tasks in optional:
    if hasattr(mo, attr):
      out.append(Method(name, lambda k, a=attr, kw=kwargs: getattr(mo, a)(
          k, **kw), uses_losses=uses_losses, min_tasks=min_tasks))
  if hasattr(mo, "ema_weights"):
    out.append(Method("CR-MOGM (EMA of MGDA)",
                      lambda k: mo.ema_weights(k, mo.mgda(k))))
  return out


def loss_weighting_methods() -> list[Method]:
  """Every single-backward (loss-weighting) method of the library."""
  table = [
      ("UW", "uncertainty_weighting", {}),
      ("DWA", "dwa", {}),
      ("FAMO", "famo", {}),
      ("STCH", "stch", {}),
      ("GLS", "gls", {}),
      ("IMTL-L", "imtl_l", {}),
      ("RLW", "random_weighting", {}),
      ("SI-LS (log losses)", "scale_invariant", {}),
      ("GradNorm", "gradnorm", {}),
      ("COSMOS", "cosmos", {}),
      ("PBI", "pbi", {}),
      ("LDC-MTL", "ldc_mtl", {}),
      ("MARIGOLD (MGDA)", "marigold", {"criterion": "mgda"}),
      ("MARIGOLD (CAGrad)", "marigold", {"criterion": "cagrad"}),
  ]
  out = []
  for name, attr, kwargs in table:
    if hasattr(mo, attr):
      out.append(Method(name, lambda k, a=attr, kw=kwargs: getattr(mo, a)(
          k, **kw), single_backward=True, uses_losses=True))
  return out


# ---------------------------------------------------------------------------
# The CAGrad toy with any method (both paths).
# ---------------------------------------------------------------------------

#: Lower bounds of the two toy losses used to make them positive for the
#: loss-based methods (the official FAMO toy's ``min_losses`` for the
#: Nash-MTL variant; for the unscaled toy both tasks are bounded by -20).
TOY_MIN_LOSSES = {1.0: (-20.1, -20.1), 0.1: (-2.1, -21.0)}


def run_toy_any(method: Method, starts=toy.NASH_MTL_STARTS,
                num_steps: int = 35_000, record_every: int = 500,
                l1_scale: float = 0.1, learning_rate: float = 1e-3
                ) -> toy.ToyRun:
  """``mtl_optax.toy.run_toy`` for a notebook ``Method`` of any kind.

  ``run_toy`` gives stacked methods the two task gradients and loss
  weightings the gradient of one weighted loss. The losses the methods see
  are shifted by ``TOY_MIN_LOSSES`` so that they are positive (the toy's
  losses reach -20, and log-loss methods need ``L > 0``); gradients are
  unchanged. Adam (lr 1e-3) takes the step, as in the official toy.
  """
  return toy.run_toy(method.make(2), starts, num_steps=num_steps,
                     learning_rate=learning_rate, record_every=record_every,
                     l1_scale=l1_scale, loss_offset=TOY_MIN_LOSSES[l1_scale])


def toy_grid(l1_scale=1.0, n=160, lim=10.0):
  xs = np.linspace(-lim, lim, n, dtype=np.float32)
  xx, yy = np.meshgrid(xs, xs)
  pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1))
  losses = np.asarray(jax.jit(jax.vmap(
      lambda t: toy.toy_losses(t, l1_scale)))(pts))
  return xx, yy, losses.reshape(n, n, 2)


def pareto_set(l1_scale=1.0, n=200):
  """The Pareto set segment x in [-7, 7] at the L0-optimal y."""
  xs = np.linspace(-7, 7, n, dtype=np.float32)
  pts = np.stack([xs, np.full_like(xs, toy.L0_OPTIMUM[1])], 1)
  losses = np.asarray(jax.vmap(lambda t: toy.toy_losses(t, l1_scale))(
      jnp.asarray(pts)))
  return pts, losses


def plot_toy_panel(ax, run: toy.ToyRun, title: str, grid, l1_scale=1.0):
  xx, yy, losses = grid
  ax.contourf(xx, yy, losses.mean(-1), levels=25, cmap="Greys", alpha=0.55)
  pts, _ = pareto_set(l1_scale, 50)
  ax.plot(pts[:, 0], pts[:, 1], color="tab:blue", lw=3, alpha=0.6)
  traj = np.asarray(run.trajectories)
  colors = ["tab:red", "tab:orange", "tab:green", "tab:purple", "tab:brown",
            "tab:pink"]
  for i in range(traj.shape[0]):
    c = colors[i % len(colors)]
    ax.plot(traj[i, :, 0], traj[i, :, 1], color=c, lw=1.4)
    ax.plot(traj[i, 0, 0], traj[i, 0, 1], "o", color=c, ms=4)
    ax.plot(traj[i, -1, 0], traj[i, -1, 1], "*", color="k", ms=7)
  ax.plot(*toy.L0_OPTIMUM, "x", color="gold", ms=9, mew=2.5)
  ax.set_xlim(-10, 10)
  ax.set_ylim(-10, 10)
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])


# ---------------------------------------------------------------------------
# Multi-digits: a MultiMNIST-style data set from sklearn's load_digits.
# ---------------------------------------------------------------------------

CANVAS = 10       # 8x8 digits on a 10x10 canvas
SHIFT = 2         # the right digit sits SHIFT pixels down and right
TASKS_2 = ("left digit", "right digit")
TASKS_6 = ("left digit", "right digit", "left parity", "left >= 5",
           "right parity", "right >= 5")


class MultiDigits(NamedTuple):
  x_train: np.ndarray      # (N, CANVAS*CANVAS) float32 in [0, 1]
  y_train: np.ndarray      # (N, K) int32 labels
  x_test: np.ndarray
  y_test: np.ndarray
  task_names: tuple
  num_classes: tuple       # classes per task


def _overlay(images, left, right):
  canvas = np.zeros((len(left), CANVAS, CANVAS), np.float32)
  canvas[:, :8, :8] = images[left]
  canvas[:, SHIFT:SHIFT + 8, SHIFT:SHIFT + 8] = np.maximum(
      canvas[:, SHIFT:SHIFT + 8, SHIFT:SHIFT + 8], images[right])
  return canvas.reshape(len(left), -1)


def _labels(digits_left, digits_right, num_tasks):
  cols = [digits_left, digits_right]
  if num_tasks == 6:
    cols += [digits_left % 2, (digits_left >= 5).astype(int),
             digits_right % 2, (digits_right >= 5).astype(int)]
  return np.stack(cols, 1).astype(np.int32)


def multi_digits(num_tasks: int = 2, n_train: int = 10_000,
                 n_test: int = 3_000, seed: int = 0) -> MultiDigits:
  """Two 8x8 digits overlaid on a 10x10 canvas (left: top-left, right: shifted).

  The 1797 bundled images are split once into disjoint train (first 1200 of
  a fixed permutation) and test pools, so test pairs are built from digit
  images never seen in training. ``num_tasks=2``: the two digit classes
  (MultiMNIST-style); ``num_tasks=6`` adds parity and ``>= 5`` of each digit.
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  if num_tasks not in (2, 6):
    raise ValueError("num_tasks must be 2 or 6.")
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  targets = digits.target.astype(np.int32)
  perm = np.random.RandomState(1234).permutation(len(images))
  pools = perm[:1200], perm[1200:]
  rng = np.random.RandomState(seed)
  out = []
  for pool, n in zip(pools, (n_train, n_test)):
    left, right = rng.choice(pool, n), rng.choice(pool, n)
    out += [_overlay(images, left, right),
            _labels(targets[left], targets[right], num_tasks)]
  names = TASKS_2 if num_tasks == 2 else TASKS_6
  classes = (10, 10) if num_tasks == 2 else (10, 10, 2, 2, 2, 2)
  return MultiDigits(*out, names, classes)


# ---------------------------------------------------------------------------
# A shared-trunk model (Flax NNX) and a functional multi-seed trainer.
# ---------------------------------------------------------------------------


class TrunkHeads(nnx.Module):
  """MLP trunk shared by all tasks, one linear head per task."""

  def __init__(self, in_dim: int, num_classes: Sequence[int], *, hidden=128,
               rep=64, rngs: nnx.Rngs):
    self.trunk = nnx.Sequential(nnx.Linear(in_dim, hidden, rngs=rngs),
                                nnx.relu, nnx.Linear(hidden, rep, rngs=rngs),
                                nnx.relu)
    self.heads = nnx.List([nnx.Linear(rep, c, rngs=rngs)
                           for c in num_classes])

  def __call__(self, x):
    z = self.trunk(x)
    return [h(z) for h in self.heads]


def cross_entropies(logits_list, labels):
  """(K,) mean cross-entropies, one per task."""
  return jnp.stack([
      jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
          logits, labels[:, i])) for i, logits in enumerate(logits_list)])


def task_losses(model, x, y):
  return cross_entropies(model(x), y)


def heads_losses(model, z, y):
  """Task losses from the shared representation ``z`` (for GradNorm)."""
  return cross_entropies([h(z) for h in model.heads], y)


def init_params(data: MultiDigits, seeds: Sequence[int], **model_kwargs):
  """``(graphdef, params)`` with params stacked over seeds (pure arrays)."""
  states = []
  graphdef = None
  for s in seeds:
    graphdef, state = nnx.split(TrunkHeads(
        data.x_train.shape[1], data.num_classes, rngs=nnx.Rngs(int(s)),
        **model_kwargs))
    states.append(nnx.as_pure(state))
  return graphdef, jax.tree.map(lambda *a: jnp.stack(a), *states)


#: optax.partition labels: the method on the trunk, a plain task sum on heads.
SHARED_AND_HEADS = mo.label_by_path({"trunk": "shared", "heads": "head"})


def make_tx(method: Method, num_tasks: int, learning_rate: float = 1e-3,
            partition: bool = True):
  """``optax.chain(method, adam)``; stacked methods act on the trunk only."""
  inner = method.make(num_tasks)
  if method.single_backward or not partition:
    return inner, optax.chain(inner, optax.adam(learning_rate))
  part = optax.partition({"shared": inner, "head": mo.task_sum(num_tasks)},
                         SHARED_AND_HEADS)
  return inner, optax.chain(part, optax.adam(learning_rate))


def method_state(opt_state, method: Method):
  """The method's own state inside ``make_tx``'s chain."""
  state = opt_state[0]
  if not method.single_backward and hasattr(state, "inner_states"):
    state = state.inner_states["shared"].inner_state
  return state


class TrainResult(NamedTuple):
  params: Any            # stacked over rows (seeds, or seeds x task masks)
  loss_curve: np.ndarray  # (rows, records, K) mean training losses
  weights_curve: Any  # (rows, records, ...) what ``record`` returns (weights)
  seconds: float


#: Plain training on the (weighted) sum of the losses, one backward pass: for
#: single-task baselines and task-group networks (with ``loss_weights``).
PLAIN_SUM = Method("sum of losses", None, single_backward=True)


def batch_indices(rows: int, num_steps: int, batch_size: int, n_data: int,
                  data_seed: int = 0) -> np.ndarray:
  """``(rows, num_steps, batch_size)`` mini-batch indices (with replacement);
  row r uses ``RandomState(data_seed + r)``: the same batches for every
  method."""
  return np.stack([np.random.RandomState(data_seed + r).randint(
      0, n_data, (num_steps, batch_size)) for r in range(rows)]).astype(
          np.int32)


def fill_masked(params, full):
  """``params`` with ``optax.MaskedNode`` leaves taken from ``full``.

  Inside ``optax.partition`` a method sees only its own leaves; a look-ahead
  ``loss_fn`` it calls gets ``MaskedNode`` for the others (the heads), which
  keep their current values.
  """
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(lambda p, f: f if is_masked(p) else p, params, full,
                      is_leaf=is_masked)


def train(method: Method, data: MultiDigits, graphdef, params0, *,
          num_steps: int, batch_size: int = 256, learning_rate: float = 1e-3,
          record_every: int = 50, partition: bool = True,
          loss_weights: Any = None, data_seed: int = 0, tx: Any = None,
          record: Callable[[Any], Any] | None = None) -> TrainResult:
  """Trains one method from every row of ``params0`` at once.

  ``jax.vmap`` over the rows (the leading axis of ``params0``: seeds), one
  ``lax.scan`` over steps, the same mini-batches for every method. Stacked
  methods take per-task gradients of the NNX model
  (``mo.nnx_value_and_task_grads``) and act on the trunk (``optax.partition``
  with ``mo.label_by_path``; heads: ``mo.task_sum``); loss weightings take one
  weighted-loss gradient (``mo.nnx_value_and_weighted_grad``). Every method
  gets ``task_losses`` and ``loss_fn``; GradNorm also gets its per-task
  gradient norms w.r.t. the shared features (``layer_grads``).
  ``loss_weights`` (``(rows, K)``) multiplies each row's task losses: 0/1
  masks give single-task baselines and task-group networks. ``tx`` replaces
  the transformation built from ``method`` (stacked gradients in); ``record``
  maps the optimizer state to what is recorded every ``record_every`` steps
  (default: the method's ``weights``).
  """
  num_tasks = len(data.num_classes)
  if num_steps % record_every:
    raise ValueError("num_steps must be a multiple of record_every.")
  rows = jax.tree.leaves(params0)[0].shape[0]
  plain = method.make is None
  if plain:
    inner, tx = None, optax.adam(learning_rate)
  elif tx is None:
    inner, tx = make_tx(method, num_tasks, learning_rate, partition)
  else:
    inner = None
  if record is None:
    record = lambda s: optax.tree.get(method_state(s, method), "weights")
  x_all = jnp.asarray(data.x_train)
  y_all = jnp.asarray(data.y_train)
  masks = jnp.ones((rows, num_tasks)) if loss_weights is None else jnp.asarray(
      loss_weights, jnp.float32)
  idx_all = jnp.asarray(batch_indices(rows, num_steps, batch_size,
                                      x_all.shape[0], data_seed)).reshape(
      rows, num_steps // record_every, record_every, batch_size)
  uses_layer_grads = method.name == "GradNorm"

  def run_one(params, mask, idx_rows):
    fn = lambda m, x, y: task_losses(m, x, y) * mask

    def step(carry, idx):
      params, opt_state = carry
      x, y = x_all[idx], y_all[idx]
      model = nnx.merge(graphdef, params)
      if plain:
        def total(p):
          losses = fn(nnx.merge(graphdef, p), x, y)
          return jnp.sum(losses), losses
        (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), losses
      extra = {"loss_fn": lambda p: fn(
          nnx.merge(graphdef, fill_masked(p, params)), x, y)}
      if method.single_backward:
        losses, grads = mo.nnx_value_and_weighted_grad(fn, inner)(
            opt_state[0], model, x, y)
      else:
        losses, grads = mo.nnx_value_and_task_grads(fn)(model, x, y)
      if uses_layer_grads:
        z = model.trunk(x)
        _, extra["layer_grads"] = mo.value_and_task_grads(
            lambda z: heads_losses(model, z, y) * mask)(z)
      updates, opt_state = tx.update(nnx.as_pure(grads), opt_state, params,
                                     task_losses=losses, **extra)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), losses

    def chunk(carry, idx_chunk):
      carry, losses = jax.lax.scan(step, carry, idx_chunk)
      recorded = mask if plain else record(carry[1])
      return carry, (losses.mean(0), recorded)

    carry = (params, tx.init(params))
    (params, _), (losses, weights) = jax.lax.scan(chunk, carry, idx_rows)
    return params, losses, weights

  with Timer() as t:
    params, losses, recorded = jax.jit(jax.vmap(run_one))(params0, masks,
                                                           idx_all)
    losses = np.asarray(losses)
  return TrainResult(params, losses, jax.tree.map(np.asarray, recorded),
                     t.seconds)


_EVAL_CACHE = {}


def evaluate(graphdef, params, x, y, batch: int = 4096):
  """Per seed and task: accuracy and mean cross-entropy. Shapes (S, K)."""
  if graphdef not in _EVAL_CACHE:
    @jax.jit
    @functools.partial(jax.vmap, in_axes=(0, None, None))
    def one(p, x, y):
      logits = nnx.merge(graphdef, p)(x)
      acc = jnp.stack([jnp.mean(jnp.argmax(l, -1) == y[:, i])
                       for i, l in enumerate(logits)])
      return acc, cross_entropies(logits, y)
    _EVAL_CACHE[graphdef] = one
  acc, ce = _EVAL_CACHE[graphdef](params, jnp.asarray(x), jnp.asarray(y))
  return np.asarray(acc), np.asarray(ce)
