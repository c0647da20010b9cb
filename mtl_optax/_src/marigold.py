"""MARIGOLD: gradient balancing from one backward pass per step (our reading).

Chen, He, Xu, Huang, Liu, Liu, Tian, Wei, Jin, Park, Long & Feng, "Feed m
Birds with One Scone: Accelerating Multi-task Gradient Balancing via Bi-level
Optimization", arXiv:2603.07389 (2026). Balances the same criteria as MGDA
(Desideri, 2012; Sener & Koltun, NeurIPS 2018) and CAGrad (Liu et al.,
NeurIPS 2021, arXiv:2110.14048) without ever forming the K per-task
gradients.

**Provenance.** Only the paper's abstract was available to us; its full text,
algorithm box and code were not. What follows the abstract:

* MGDA-type weighting is expensive because it needs all K task gradients;
* gradient balancing and model training are coupled throughout training,
  i.e. a bi-level problem: the task weights ``w`` (lower level, a balancing
  criterion) and the model ``theta`` (upper level, trained along the
  ``w``-weighted gradient);
* the bi-level problem is solved with a zeroth-order method;
* one framework covers several balancing methods.

Everything else is our design: the criteria's exact forms, the estimators, the step-size rule,
the finite-difference radius, the EMA, the update period and every default.
Re-check them against the paper when its text becomes available.

**The method (our reading).** ``w`` lives on the simplex and is advanced by
one projected step per training step (single loop, warm started):
``w <- P_simplex(w - beta * grad_Phi(w) / curvature)`` (``beta =
learning_rate``). The model step is
``g_c = J^T c``, the gradient of ONE weighted loss ``sum_i c_i L_i`` with
``c = state.next_weights`` (``c = w`` for MGDA and the look-ahead criterion,
``c = (1/K + lambda w) / s`` for CAGrad), from one backward pass of the
caller's :func:`mtl_optax.value_and_weighted_grad`. ``grad_Phi`` is estimated
from function values only:

* ``estimator='gram_vector'`` (default, §2.4): every MGDA-type criterion is
  driven by Gram-vector products ``G v = J (J^T v)``, and ``J d`` for any
  parameter-space direction ``d`` is the vector of the K directional
  derivatives of the task losses, estimated from ONE extra forward pass of
  ``loss_fn``: ``J d ~ [l(theta) - l(theta - mu d)] / mu`` (``O(mu)`` error;
  ``difference='central'`` uses ``l(theta + mu d)`` instead of ``l(theta)``,
  ``O(mu**2)``, one more forward). Along the caller's gradient ``d = J^T w``
  this gives ``G w``, the MGDA gradient, whatever K is.
* ``estimator='random_directions'`` (§2.3): zeroth-order in weight space.
  ``Phi`` is evaluated at ``w +- mu u_k`` for ``q = num_directions`` random
  unit directions ``u_k`` of the simplex's tangent space (``J^T u_k`` from
  ``q`` batched backward passes), and ``grad_Phi ~ (K-1)/q sum_k
  [Phi(w + mu u_k) - Phi(w - mu u_k)] / (2 mu) u_k``. With
  ``residual_feedback=True`` (MGDA only) the one-point residual-feedback
  estimator of Zhang, Zhou, Ji & Zavlanos (arXiv:2006.10820) needs no extra
  pass at all: the caller trains on the perturbed weights ``w + mu u_t``,
  ``Phi_t = ||J^T (w_t + mu u_t)||**2 / 2`` is read off the gradient it
  already has, and ``grad_Phi ~ (Phi_t - Phi_{t-1}) / mu u_t``.
* ``estimator='jvp'`` (not in the paper: exact forward mode): the same
  criteria as ``gram_vector``, with every ``J d`` computed exactly by one
  batched ``jax.jvp`` of ``loss_fn`` (the probe's tangent included), e.g.
  ``G c = J (J^T c) = jvp(loss_fn, (theta,), (g_c,))[1]``: no finite
  difference, no radius, no bias, so with ``theta`` frozen the weights
  converge to the exact method's. One forward-mode pass (about the cost of
  two to three forwards) replaces the look-ahead and probe forwards.

Criteria (``criterion=``), with what each costs per step on top of the
caller's forward + backward (gram_vector; "probe" below is one forward):

* ``'mgda'``: ``Phi = ||g_w||**2 / 2``, gradient ``G w``. One look-ahead
  forward + the probe. Total: 1 backward.
* ``'cagrad'``: CAGrad's dual ``F(w) = g_w^T g0 + c ||g0|| ||g_w||``, gradient
  ``G b + lambda G w`` (``b = 1/K``, ``lambda = c ||g0|| / ||g_w||``). It needs
  ``G b`` as well as ``G w``: we take the second product, ``g_w = J^T w``,
  from one more backward (the caller's gradient then gives ``g0 = s g_c -
  lambda g_w`` exactly), and two look-ahead forwards + the probe. Total: 2
  backward passes. (The alternative, an EMA of ``G b`` refreshed every few
  steps, is not implemented: ``update_every`` already spaces out all the
  extra work.) Note ``grad F(w) = G c`` with ``c`` the effective coefficients.
* ``'lookahead'``: ``Phi(w) = mean_i L_i(theta - alpha g_w)`` with ``alpha =
  lookahead_lr``: the continuous version of IT-MTL's choice between candidate
  directions by their look-ahead loss (Fifty et al., arXiv:2010.15413; the
  transference ratio is this with losses normalised by ``L_i(theta)``: pass a
  ``loss_fn`` returning normalised losses for that). Gradient ``-alpha J
  grad Lbar(theta - alpha g_w)``: one forward + backward at the look-ahead
  point, one look-ahead forward + the probe. Total: 2 backward passes.

Backward passes per step never grow with K: 1, 2, 2 above; ``1 + q`` (``2 +
q`` for CAGrad) for random directions; 1 for residual feedback. Exact MGDA or
CAGrad take K (:func:`mtl_optax.value_and_task_grads`).

**Step size (our design).** ``beta = learning_rate`` is dimensionless: the
estimated gradient is divided by an estimate of the largest curvature of the
criterion on the simplex's tangent space, which makes projected gradient
stable for ``beta < 2`` and invariant to the scale of the losses. For
gram_vector (and jvp) that curvature is the top eigenvalue of ``P G P`` (``P`` the
centring projection) from a Hutchinson-style "probe": one forward at ``theta
+ radius v`` with a Rademacher ``v`` gives ``u = P J v``, and ``E[u u^T] = P G
P`` (so ``E ||u||**2 = tr P G P = sum_i ||g_i - g0||**2``, the spread of the
task gradients). The outer products are averaged over steps (decay 0.9; the
state keeps the trace and the trace-one shape); few samples overestimate the
top eigenvalue (one sample gives the trace), which errs on the safe side. It
is multiplied by ``lambda`` (CAGrad) or ``max(alpha kappa, 1)`` (look-ahead;
``kappa`` the loss curvature along ``g_w``, measured from the look-ahead
values). Random directions use the mean second difference along ``u_k``
times ``K - 1`` (a trace estimate). Steps are capped at length ``beta`` in
weight space. A fixed point does not depend on the step size, so with
``theta`` frozen the iterates converge to the weights of the exact method, up
to the estimator's bias (``O(radius)``).

**Finite-difference radius and its control (our design).** ``radius`` is the
root-mean-square displacement per parameter of the look-ahead points (so
``||mu d|| = radius sqrt(n)`` for ``n`` parameters): the units of an
optimizer step (Adam moves each coordinate by about its learning rate);
default 1e-3. Which radius is accurate depends on the curvature along the
direction (on an MLP, a forward difference one Adam step long along the
gradient can be 100 % off) and on rounding. So by default the radius is
controlled: for a look-ahead direction ``x``, the combination ``c . J x`` of
the K estimates is known exactly, ``<g_c, x>`` (an inner product with the
caller's gradient), which measures the estimate's error at no cost; the
radius is halved while that error, relative to ``||g_c||``, exceeds
``radius_tolerance`` (1e-2) and doubled while the rounding error
``eps |l| / displacement`` exceeds half of it. ``radius`` is then the
starting value; ``radius_tolerance=None`` keeps it fixed (bias ``O(radius)``,
``O(radius**2)`` central). The look-ahead must change the losses measurably
in the working precision: keep float32 master parameters under mixed
precision. For random directions ``radius`` is the perturbation of the
weights (default 1e-2), with no control (their values are exact there,
except for the look-ahead criterion).

**Scale.** The returned update is the caller's gradient ``g_c`` unchanged:
the scale of ``g0`` (MGDA, look-ahead: a convex combination; CAGrad: ``(g0 +
lambda g_w) / s``, ``s = 1, 1 + c**2, 1 + c`` for ``rescale = 0, 1, 2``, as
:func:`mtl_optax.cagrad`).

**The training step** (single-backward path)::

    method = mo.marigold(K)
    tx = optax.chain(method, optax.adam(1e-3))
    losses, grads = mo.value_and_weighted_grad(task_losses, tx)(
        opt_state, params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params, task_losses=losses,
        loss_fn=lambda p: task_losses(p, batch))

``loss_fn`` must be a deterministic function of the parameters on the
current batch (no fresh dropout masks), and ``task_losses`` its value at
``params``. With stacked per-task gradients instead (e.g. from
:func:`mtl_optax.value_and_task_grads`) ``update`` returns ``sum_i c_i g_i``
and advances ``w`` the same way, so both paths agree.

**With** ``optax.partition`` the method sees the parameters of its own
partition, with ``optax.MaskedNode`` in place of the others: wrap ``loss_fn``
with ``mo.masked_loss_fn(loss_fn, params)`` (it fills those from the
full parameters), and
give the other partitions ``optax.identity()`` on the single-backward path
(their gradient is already ``sum_i c_i grad L_i``; ``mo.task_sum`` wants
stacked gradients). The look-ahead then moves only the method's leaves, so
the Gram products are over those leaves, as with Gram-based methods.

**With** ``optax.inject_hyperparams`` nothing changes: the coefficients are
read through ``update`` (a probe), so the injected values are used.

**Non-finite input.** A NaN/inf gradient or task loss gives a NaN update (for
``optax.apply_if_finite``) and leaves the state unchanged; a non-finite
look-ahead loss leaves the state unchanged and passes the gradient through.

Example (the training step; the weights track exact MGDA's, computed here
from the per-task gradients only to compare)::

    >>> import jax, jax.numpy as jnp, numpy as np, optax, mtl_optax as mo
    >>> targets, scales = jnp.array([[1., 0.], [0., 1.]]), jnp.array([1., 4.])
    >>> def task_losses(theta, x):
    ...   return 0.5 * scales * jnp.sum((x * theta - targets) ** 2, axis=1)
    >>> method = mo.marigold(2)
    >>> tx = optax.chain(method, optax.sgd(0.05))
    >>> theta, x = jnp.array([1.5, 1.5]), jnp.ones(2)
    >>> opt_state = tx.init(theta)
    >>> @jax.jit
    ... def train_step(theta, opt_state, x):
    ...   losses, grads = mo.value_and_weighted_grad(task_losses, tx)(
    ...       opt_state, theta, x)                     # one backward pass
    ...   updates, opt_state = tx.update(
    ...       grads, opt_state, theta, task_losses=losses,
    ...       loss_fn=lambda p: task_losses(p, x))    # + look-ahead forwards
    ...   return optax.apply_updates(theta, updates), opt_state
    >>> for _ in range(30):
    ...   theta, opt_state = train_step(theta, opt_state, x)
    >>> print(np.asarray(opt_state[0].weights, np.float64).round(2))
    [0.95 0.05]
    >>> _, per_task = mo.value_and_task_grads(task_losses)(theta, x)
    >>> exact = mo.mgda(2)
    >>> _, exact_state = exact.update(per_task, exact.init(theta))
    >>> print(np.asarray(exact_state.weights, np.float64).round(2))
    [0.95 0.05]
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import cagrad as _cagrad
from mtl_optax._src import deprecation
from mtl_optax._src import prng
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = ("marigold", "MarigoldState", "GramVectorState", "JvpState",
           "ResidualFeedbackState", "CAGradCriterionState",
           "gram_vector_product", "CRITERIA", "ESTIMATORS")

CRITERIA = ("mgda", "cagrad", "lookahead")
ESTIMATORS = ("gram_vector", "random_directions", "jvp")
DIFFERENCES = ("forward", "central")

# Decay of the running curvature-trace estimate (the probe is a single
# Rademacher direction; 0.9 averages about 19 of them).
_CURVATURE_DECAY = 0.9
_METHOD = "marigold"


# --------------------------------------------------------------------------
# State: a core every configuration uses, and the parts only some carry.


class GramVectorState(NamedTuple):
  """Estimator state of ``estimator='gram_vector'``.

  Attributes:
    spread_shape: ``(K, K)`` the running estimate of ``P G P`` divided by its
      trace (from the probe); its top eigenvalue times ``scale**2`` is the
      curvature the weight step is divided by.
    radius_scale: ``()`` factor on ``radius`` set by the finite-difference
      error control (``radius_tolerance``; 1 without it).
  """
  spread_shape: jax.Array
  radius_scale: jax.Array


class JvpState(NamedTuple):
  """Estimator state of ``estimator='jvp'``: ``spread_shape`` as in
  ``GramVectorState`` (exact products need no radius)."""
  spread_shape: jax.Array


class ResidualFeedbackState(NamedTuple):
  """Estimator state of one-point residual feedback.

  Attributes:
    direction: ``(K,)`` the current weight perturbation ``u``.
    previous: ``()`` the previous ``||g_c||``.
  """
  direction: jax.Array
  previous: jax.Array


class CAGradCriterionState(NamedTuple):
  """Criterion state of ``criterion='cagrad'``.

  Attributes:
    multiplier: ``()`` CAGrad's ``lambda`` in the coefficients.
  """
  multiplier: jax.Array


# Fields of the former flat state, now in a sub-state: the sub-state's name.
_MOVED_FIELDS = {"spread_shape": "estimator_state",
                 "radius_scale": "estimator_state",
                 "direction": "estimator_state",
                 "previous": "estimator_state",
                 "multiplier": "criterion_state"}


class MarigoldState(NamedTuple):
  """State of :func:`marigold`.

  Attributes:
    weights: ``(K,)`` coefficients ``c`` of the last update (``update =
      sum_i c_i g_i``, the gradient of ``sum_i c_i L_i``): ``w`` for the MGDA
      and look-ahead criteria, ``(1/K + lambda w) / s`` for CAGrad, ``w + mu
      u`` with residual feedback.
    next_weights: ``(K,)`` the coefficients of the caller's next weighted
      loss (what ``mo.value_and_weighted_grad`` uses): ``weights`` after this
      step's advance of ``w``.
    simplex_weights: ``(K,)`` the balancing variable ``w`` on the simplex.
    gradient_ema: ``(K,)`` EMA (``decay``) of the normalised step direction
      ``grad_Phi / curvature``.
    scale: ``()`` square root of the running estimate of the curvature trace
      (gram_vector, jvp: of ``tr P G P``); residual feedback: RMS of the
      normalised differences.
    residual: ``()`` length of the last weight step divided by
      ``learning_rate`` (0 at the estimated optimum).
    count: ``()`` number of ``update`` calls.
    key: PRNG key (probe and random directions).
    estimator_state: ``GramVectorState``, ``JvpState``,
      ``ResidualFeedbackState``, or ``optax.EmptyState()`` (two-point
      random directions).
    criterion_state: ``CAGradCriterionState`` (CAGrad) or
      ``optax.EmptyState()``.

  The former flat fields ``spread_shape``, ``radius_scale``, ``direction``,
  ``previous`` and ``multiplier`` are deprecated read-only properties that
  read the sub-states.
  """
  weights: jax.Array
  next_weights: jax.Array
  simplex_weights: jax.Array
  gradient_ema: jax.Array
  scale: jax.Array
  residual: jax.Array
  count: jax.Array
  key: jax.Array
  estimator_state: Any
  criterion_state: Any

  def _moved(self, name):
    where = _MOVED_FIELDS[name]
    warnings.warn(f"MarigoldState.{name} is deprecated: read "
                  f"state.{where}.{name}.", DeprecationWarning, stacklevel=3)
    return getattr(getattr(self, where), name)

  spread_shape = property(lambda self: self._moved("spread_shape"))
  radius_scale = property(lambda self: self._moved("radius_scale"))
  direction = property(lambda self: self._moved("direction"))
  previous = property(lambda self: self._moved("previous"))
  multiplier = property(lambda self: self._moved("multiplier"))


base.register_loss_weighting_state(MarigoldState)


class _Config(NamedTuple):
  """The hyper-parameters, as the parts of the method read them."""
  num_tasks: int
  criterion: str
  learning_rate: Any
  radius: Any
  c: Any
  rescale: Any
  lookahead_lr: Any
  decay: Any
  num_directions: int
  residual_feedback: bool
  central: bool
  radius_tolerance: Any


class _Context(NamedTuple):
  """What one ``update`` call gives the estimators."""
  params: Any
  loss_fn: Callable[[Any], jax.Array]
  base_losses: jax.Array
  direction: Any          # the caller's gradient g_c = J^T c
  vjp: Callable[[jax.Array], Any]
  vjp_many: Callable[[jax.Array], Any]
  num_params: int


# --------------------------------------------------------------------------
# Small numerics.


def _vector_norm(v: jax.Array) -> jax.Array:
  """Euclidean norm of a small vector without overflow or underflow."""
  peak = jnp.max(jnp.abs(v))
  safe = jnp.where(peak > 0, peak, 1.0)
  return jnp.where(peak > 0, peak * jnp.sqrt(jnp.sum((v / safe) ** 2)), peak)


def _safe_div(a, b):
  """``a / b``, and 0 where ``b == 0`` (NaN stays NaN)."""
  return jnp.where(b == 0, jnp.zeros_like(a), a / jnp.where(b == 0, 1.0, b))


def _ema_norm(old: jax.Array, new: jax.Array, decay) -> jax.Array:
  """``sqrt(decay old**2 + (1 - decay) new**2)``; ``new`` when ``old == 0``."""
  peak = jnp.maximum(old, new)
  safe = jnp.where(peak > 0, peak, 1.0)
  mixed = peak * jnp.sqrt(decay * (old / safe) ** 2 +
                          (1 - decay) * (new / safe) ** 2)
  return jnp.where(old == 0, new, mixed)


def _centre(v: jax.Array) -> jax.Array:
  """Projection onto the simplex's tangent space ``{sum = 0}``."""
  return v - jnp.mean(v)


def _stack(vectors) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)


def _gram(vectors) -> tuple[jax.Array, jax.Array]:
  """Gram matrix of parameter-space vectors as ``(A / m**2, m)``.

  ``m`` is the largest absolute entry of the vectors: dividing by it first
  makes the result safe for any magnitude (1e-30 ... 1e30 in float32) with no
  branch; the products are :func:`tree_math.gram_matrix`'s (float32 or wider).
  """
  stacked = _stack(vectors)
  dtype = tree_math.accumulation_dtype(stacked)
  peak = tree_math.tree_max_abs(stacked, dtype)
  safe = jnp.where(peak > 0, peak, 1.0)
  scaled = jax.tree.map(lambda x: x.astype(dtype) / safe, stacked)
  return tree_math.gram_matrix(scaled, dtype), peak


def _norm(tree) -> jax.Array:
  """Euclidean norm of a parameter-space vector, safe for any magnitude."""
  gram, peak = _gram([tree])
  return peak * jnp.sqrt(gram[0, 0])


def _num_params(params) -> int:
  return int(sum(np.prod(np.shape(x), dtype=np.int64)
                 for x in jax.tree.leaves(params)))


def _axpy(a, x, y):
  """``a x + y`` leaf by leaf, computed in float32 or wider, in y's dtype."""
  def f(xi, yi):
    acc = jnp.result_type(jnp.float32, xi.dtype, yi.dtype)
    return (jnp.asarray(a, acc) * xi.astype(acc) + yi.astype(acc)).astype(
        yi.dtype)
  return jax.tree.map(f, x, y)


def _scale_tree(a, x):
  return jax.tree.map(lambda xi: (jnp.asarray(a, jnp.result_type(
      jnp.float32, xi.dtype)) * xi).astype(xi.dtype), x)


def _unit_direction(params, direction, norm, dtype):
  """``direction / norm`` in the dtypes of ``params`` (zeros if norm is 0)."""
  safe = jnp.where(norm != 0, norm, 1.0)

  def f(p, x):
    acc = jnp.result_type(jnp.float32, p.dtype, x.dtype, dtype)
    return (x.astype(acc) / safe.astype(acc)).astype(p.dtype)
  return jax.tree.map(f, params, direction)


def _unit(scale, fallback):
  """The unit the products are measured in: the curvature scale, else the
  criterion's own vector scale (a zero probe), else 1."""
  return jnp.where(scale > 0, scale, jnp.where(fallback > 0, fallback, 1.0))


def _cagrad_divisor(cfg, dtype):
  return _cagrad.rescale_divisor(cfg.rescale, jnp.asarray(cfg.c, dtype))


def _cagrad_multiplier(cfg, norm_0, norm_w):
  """CAGrad's ``lambda = c ||g0|| / ||g_w||`` (0 where ``g_w`` vanished:
  below ``sqrt(eps)`` of the larger norm), as :func:`mtl_optax.cagrad`."""
  dtype = norm_0.dtype
  floor = jnp.sqrt(jnp.finfo(dtype).eps) * jnp.maximum(norm_0, norm_w)
  return _cagrad.cagrad_multiplier(jnp.asarray(cfg.c, dtype), norm_0, norm_w,
                                   floor)


def _cagrad_mean_gradient(cfg, state, ctx, g_w, acc):
  """``g0 = s g_c - lambda g_w``: the mean gradient, exactly, from the
  caller's ``g_c = (g0 + lambda g_w) / s`` and one more gradient ``g_w``."""
  return _axpy(-state.criterion_state.multiplier.astype(acc), g_w,
               _scale_tree(_cagrad_divisor(cfg, acc), ctx.direction))


# --------------------------------------------------------------------------
# Zeroth-order and forward-mode primitives.


def _directional_derivatives(loss_fn, params, base_losses, direction, norm,
                             displacement, central, dtype):
  """``J direction / ||direction||`` (K,) from loss values at look-ahead points.

  The look-ahead points are ``params -+ displacement * direction / norm``;
  ``base_losses`` is ``loss_fn(params)`` (unused when ``central``). A zero
  direction gives zeros; NaN stays NaN. Also returns the rounding error of
  each entry (``eps |losses| / displacement``).
  """
  safe = jnp.where(norm != 0, norm, 1.0)

  def moved(sign):
    def f(p, x):
      acc = jnp.result_type(jnp.float32, p.dtype, x.dtype, dtype)
      unit = x.astype(acc) / safe.astype(acc)
      return (p.astype(acc) + sign * displacement * unit).astype(p.dtype)
    return jax.tree.map(f, params, direction)

  behind_raw = jnp.asarray(loss_fn(moved(-1.0)))
  eps = jnp.finfo(behind_raw.dtype).eps
  behind = behind_raw.astype(dtype)
  if central:
    ahead = jnp.asarray(loss_fn(moved(1.0))).astype(dtype)
    deriv = (ahead - behind) / (2 * displacement)
    noise = eps * (jnp.abs(ahead) + jnp.abs(behind)) / (2 * displacement)
  else:
    deriv = (base_losses - behind) / displacement
    noise = eps * (jnp.abs(base_losses) + jnp.abs(behind)) / displacement
  zero = norm == 0
  return (jnp.where(zero, jnp.zeros_like(deriv), deriv),
          jnp.where(zero, jnp.zeros_like(noise), noise))


def _rademacher_tree(key, params, dtype):
  """A tree of independent +-1 entries shaped like ``params``.

  One random draw of ``n / 32`` words for the whole tree (one bit per
  parameter), split into leaves: cheaper to compile and run than one draw per
  leaf.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [int(np.prod(np.shape(x), dtype=np.int64)) for x in leaves]
  total = max(sum(sizes), 1)
  # Through jax.random, not the straight-line draws of prng: this draw feeds
  # every leaf, and XLA would recompute a straight-line hash inside each
  # leaf's kernel (the 200-leaf step compiled 1.4x slower).
  words = jax.random.bits(key, (-(-total // 32),), jnp.uint32)
  bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
  signs = (2 * bits.reshape(-1)[:total].astype(dtype) - 1)
  out, offset = [], 0
  for x, size in zip(leaves, sizes):
    out.append(signs[offset:offset + size].reshape(np.shape(x)))
    offset += size
  return treedef.unflatten(out)


def _probe(loss_fn, params, base_losses, key, radius, num_params, dtype):
  """``P J v`` for a Rademacher ``v`` (forward difference): ``E[(P J v)(P J
  v)^T] = P G P``, so its squared norm estimates ``tr P G P``."""
  root_n = jnp.asarray(math.sqrt(num_params), dtype)
  jv, _ = _directional_derivatives(  # J v / sqrt(n)
      loss_fn, params, base_losses, _rademacher_tree(key, params, dtype),
      root_n, radius * root_n, False, dtype)
  return root_n * _centre(jv)


def _jvp_many(loss_fn, params, tangents, dtype):
  """``(m, K)`` rows ``J t`` for ``m`` tangents, exactly: one forward-mode
  pass (``jax.jvp`` vmapped over the tangents; the primal is computed once)."""
  stacked = _stack(tangents)
  rows = jax.vmap(lambda t: jax.jvp(loss_fn, (params,), (t,))[1])(stacked)
  return jnp.asarray(rows).astype(dtype)


def gram_vector_product(loss_fn: Callable[[Any], jax.Array], params: Any,
                        vector: jax.Array, radius: float = 1e-3,
                        difference: str = "forward",
                        task_losses: Optional[jax.Array] = None) -> jax.Array:
  """``G v`` from one backward and one forward pass: MARIGOLD's primitive.

  ``G = J J^T`` is the Gram matrix of the task gradients, ``J^T v`` the
  gradient of ``sum_i v_i L_i`` (one VJP) and ``J d ~ [l(theta) - l(theta -
  mu d)] / mu`` the K directional derivatives from the losses at one
  look-ahead point, ``||mu d|| = radius * sqrt(n)``. Error ``O(radius)``
  (``difference='central'``: ``O(radius**2)``, one more forward). For tests
  and diagnostics; :func:`marigold` uses the same estimate inside ``update``
  (``estimator='jvp'`` computes ``J d`` exactly instead).

  Args:
    loss_fn: ``params -> (K,)`` task losses.
    params: the point.
    vector: ``(K,)`` the vector ``v``.
    radius: RMS displacement per parameter of the look-ahead point.
    difference: ``'forward'`` or ``'central'``.
    task_losses: ``loss_fn(params)`` if already known (forward only).

  Returns:
    ``(K,)`` estimate of ``G v``.

  Example (linear losses: the estimate is exact):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax._src.marigold import gram_vector_product
    >>> jac = jnp.array([[1., 2.], [3., -1.]])
    >>> gv = gram_vector_product(lambda p: jac @ p, jnp.zeros(2),
    ...                          jnp.array([1., 0.]))
    >>> print(np.asarray(gv, np.float64).round(3), jac @ jac.T @ jnp.array([1., 0.]))
    [5. 1.] [5. 1.]
  """
  if difference not in DIFFERENCES:
    raise ValueError(f"difference must be one of {DIFFERENCES}, got "
                     f"{difference!r}.")
  losses, vjp_fn = jax.vjp(loss_fn, params)
  dtype = jnp.promote_types(jnp.asarray(losses).dtype, jnp.float32)
  base_losses = (losses if task_losses is None else
                 jnp.asarray(task_losses)).astype(dtype)
  (direction,) = vjp_fn(jnp.asarray(vector).astype(losses.dtype))
  norm = _norm(direction)
  n = _num_params(params)
  deriv, _ = _directional_derivatives(
      loss_fn, params, base_losses, direction, norm.astype(dtype),
      jnp.asarray(radius, dtype) * math.sqrt(n), difference == "central",
      dtype)
  return norm.astype(dtype) * deriv


# --------------------------------------------------------------------------
# The weight step, shared by every estimator.


def _coefficients(cfg, w, lam, direction):
  """The caller's next coefficients ``c`` for simplex weights ``w``."""
  if cfg.criterion == "cagrad":
    return (1.0 / cfg.num_tasks + lam * w) / _cagrad_divisor(cfg, w.dtype)
  if cfg.residual_feedback:
    return w + jnp.asarray(cfg.radius, w.dtype) * direction
  return w


def _take_step(cfg, state, grad, curvature):
  """``w <- P(w - beta * EMA(grad / curvature))``, steps capped at beta."""
  dtype = state.simplex_weights.dtype
  grad = _centre(grad.astype(dtype))
  curvature = curvature.astype(dtype)
  denom = jnp.maximum(curvature, _vector_norm(grad))
  normalised = _safe_div(grad, denom)
  decay = jnp.asarray(cfg.decay, dtype)
  momentum = decay * state.gradient_ema + (1 - decay) * normalised
  w = state.simplex_weights
  beta = jnp.asarray(cfg.learning_rate, dtype)
  new_w = solvers.project_to_simplex(w - beta * momentum)
  residual = _safe_div(_vector_norm(new_w - w), beta)
  return new_w, momentum, residual


def _stepped(cfg, state, grad, curvature, lam, scale, key, dtype,
             direction=None):
  """The state after one weight step (the sub-states are the caller's)."""
  new_w, momentum, residual = _take_step(cfg, state, grad, curvature)
  criterion_state = state.criterion_state
  if cfg.criterion == "cagrad":
    criterion_state = CAGradCriterionState(lam.astype(dtype))
  return state._replace(
      next_weights=_coefficients(cfg, new_w, lam, direction).astype(dtype),
      simplex_weights=new_w.astype(dtype), gradient_ema=momentum,
      scale=scale.astype(dtype), residual=residual.astype(dtype), key=key,
      criterion_state=criterion_state)


# --------------------------------------------------------------------------
# Criteria driven by Gram-vector products (gram_vector, jvp). Each is a
# request (the parameter-space vectors x whose J x / ||x|| it needs) and a
# combination of those products into grad_Phi and its curvature factor.


class _Request(NamedTuple):
  vectors: tuple    # parameter-space vectors x_k
  norms: tuple      # ||x_k||
  checked: int      # index of the x whose c . J x = <g_c, x> is known ...
  exact: Any        # ... <g_c, x / ||x||> ...
  check_scale: Any  # ... and the scale its error is relative to
  fallback: Any     # the criterion's vector scale (for _unit)
  aux: Any


class _Gradient(NamedTuple):
  grad: jax.Array     # grad_Phi / unit**2
  factor: jax.Array   # curvature = factor * top * (scale / unit)**2
  multiplier: jax.Array


def _mgda_request(cfg, state, ctx, acc):
  """``Phi = ||g_w||**2 / 2``: ``grad = G w = J g_w``, with ``g_w = g_c``."""
  del cfg, state, acc
  norm_d = _norm(ctx.direction)
  return _Request((ctx.direction,), (norm_d,), 0, norm_d, norm_d, norm_d, None)


def _mgda_gradient(cfg, request, derivs, unit):
  del cfg
  (norm_d,), (jd,) = request.norms, derivs
  return _Gradient((norm_d / unit) * (jd / unit), jnp.ones_like(unit),
                   jnp.zeros_like(unit))


def _cagrad_request(cfg, state, ctx, acc):
  """CAGrad's dual: ``grad = G b + lambda G w = J g0 + lambda J g_w``, with
  ``g_w`` from one more backward pass and ``g0`` from ``g_c``."""
  w = state.simplex_weights.astype(acc)
  g_w = ctx.vjp(w)
  g0 = _cagrad_mean_gradient(cfg, state, ctx, g_w, acc)
  gram, r = _gram([g0, g_w])
  norm_0 = r * jnp.sqrt(jnp.maximum(gram[0, 0], 0.0))
  norm_w = r * jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
  # g_c = (g0 + lam_t g_w) / s: its norm and <g_c, g_w / ||g_w||>.
  lam_t = state.criterion_state.multiplier.astype(acc)
  coef = jnp.stack([1.0, lam_t]) / _cagrad_divisor(cfg, acc)
  norm_c = r * jnp.sqrt(jnp.maximum(coef @ gram @ coef, 0.0))
  dot_cw = r * _safe_div(coef @ gram[:, 1], jnp.sqrt(gram[1, 1]))
  return _Request((g0, g_w), (norm_0, norm_w), 1, dot_cw, norm_c, r, None)


def _cagrad_gradient(cfg, request, derivs, unit):
  (norm_0, norm_w), (d0, dw) = request.norms, derivs
  gb = (norm_0 / unit) * (d0 / unit)                    # G b / unit**2
  gw = (norm_w / unit) * (dw / unit)                    # G w / unit**2
  lam = _cagrad_multiplier(cfg, norm_0, norm_w)
  return _Gradient(gb + lam * gw, lam, lam)


def _lookahead_request(cfg, state, ctx, acc):
  """``Phi = mean_i L_i(theta - alpha g_w)``: ``grad = -alpha J grad
  Lbar(theta')``, with the gradient at the look-ahead point from one
  backward pass."""
  del state
  alpha = jnp.asarray(cfg.lookahead_lr, acc)
  ahead = _axpy(-alpha, ctx.direction, ctx.params)       # theta - alpha g_w
  ahead_losses, vjp_ahead = jax.vjp(ctx.loss_fn, ahead)
  (g_ahead,) = vjp_ahead(jnp.full((cfg.num_tasks,), 1.0 / cfg.num_tasks,
                                  jnp.asarray(ahead_losses).dtype))
  gram, r = _gram([ctx.direction, g_ahead])
  norm_d = r * jnp.sqrt(jnp.maximum(gram[0, 0], 0.0))
  norm_a = r * jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
  dot_da = r * _safe_div(gram[0, 1], jnp.sqrt(gram[1, 1]))
  # alpha * kappa, kappa = g_w^T H g_w / ||g_w||^2 of the mean loss, from
  # Lbar(theta) - Lbar(theta') = alpha g0.g_w - alpha^2/2 g_w^T H g_w and
  # g_w . grad Lbar(theta') = g0.g_w - alpha g_w^T H g_w.
  drop = jnp.mean(ctx.base_losses) - jnp.mean(
      jnp.asarray(ahead_losses).astype(acc))
  cross = _safe_div(gram[0, 1], gram[0, 0])             # <d, g'>/||d||^2
  alpha_kappa = 2 * (_safe_div(_safe_div(drop, alpha), norm_d * norm_d)
                     - cross)
  return _Request((g_ahead,), (norm_a,), 0, dot_da, norm_d, r, alpha_kappa)


def _lookahead_gradient(cfg, request, derivs, unit):
  del cfg
  (norm_a,), (da,) = request.norms, derivs
  return _Gradient(-(norm_a / unit) * (da / unit),
                   jnp.maximum(request.aux, 1.0), jnp.zeros_like(unit))


_PRODUCT_CRITERIA = {"mgda": (_mgda_request, _mgda_gradient),
                     "cagrad": (_cagrad_request, _cagrad_gradient),
                     "lookahead": (_lookahead_request, _lookahead_gradient)}


# --------------------------------------------------------------------------
# Estimators of the products J x: finite differences (gram_vector, §2.4) and
# exact forward mode (jvp). Each returns the products, the probe P J v and
# its own next sub-state (spread_shape is filled in by the caller).


def _finite_difference_products(cfg, state, ctx, request, probe_key, acc):
  sub = state.estimator_state
  rad = jnp.asarray(cfg.radius, acc) * sub.radius_scale.astype(acc)
  displacement = rad * math.sqrt(ctx.num_params)
  probe = _probe(ctx.loss_fn, ctx.params, ctx.base_losses, probe_key, rad,
                 ctx.num_params, acc)
  derivs, noises = zip(*[_directional_derivatives(
      ctx.loss_fn, ctx.params, ctx.base_losses, x, norm, displacement,
      cfg.central, acc) for x, norm in zip(request.vectors, request.norms)])
  if cfg.radius_tolerance is None:
    return derivs, probe, sub
  # The combination c . J x of the checked estimate is known exactly (an
  # inner product with the caller's gradient): its error sets the radius.
  c_now = state.next_weights.astype(acc)
  k = request.checked
  error = _safe_div(jnp.abs(c_now @ derivs[k] - request.exact),
                    request.check_scale)
  rounding = _safe_div(jnp.abs(c_now) @ noises[k], request.check_scale)
  tol = jnp.asarray(cfg.radius_tolerance, acc)
  factor = jnp.where(rounding > tol / 2, 2.0,
                     jnp.where(error > tol, 0.5, 1.0))
  radius_scale = jnp.clip(sub.radius_scale.astype(acc) * factor,
                          2.0 ** -30, 2.0 ** 10)
  return derivs, probe, sub._replace(
      radius_scale=radius_scale.astype(sub.radius_scale.dtype))


def _jvp_products(cfg, state, ctx, request, probe_key, acc):
  """``J (x / ||x||)`` and the probe ``P J v`` exactly, in one batched
  forward-mode pass."""
  del cfg
  tangents = [_unit_direction(ctx.params, x, norm, acc)
              for x, norm in zip(request.vectors, request.norms)]
  tangents.append(jax.tree.map(lambda p, v: v.astype(p.dtype), ctx.params,
                               _rademacher_tree(probe_key, ctx.params, acc)))
  rows = _jvp_many(ctx.loss_fn, ctx.params, tangents, acc)
  return tuple(rows[:-1]), _centre(rows[-1]), state.estimator_state


def _spread(state, probe, acc):
  """Curvature: an EMA of the probe's outer products estimates ``P G P``,
  kept as its trace (``scale**2``, in raw units, as a norm for range) and
  its trace-one shape; returns those and the shape's top eigenvalue."""
  spread = _vector_norm(probe)
  old_scale = state.scale.astype(acc)
  scale = _ema_norm(old_scale, spread, _CURVATURE_DECAY)
  keep = jnp.where(old_scale == 0, 0.0, _CURVATURE_DECAY * _safe_div(
      old_scale, scale) ** 2)
  add = jnp.where(old_scale == 0, 1.0, (1 - _CURVATURE_DECAY) * _safe_div(
      spread, scale) ** 2)
  direction = _safe_div(probe, spread)
  shape = (keep * state.estimator_state.spread_shape.astype(acc) +
           add * jnp.outer(direction, direction))
  return scale, shape, solvers.largest_eigenvalue(shape)  # top in (0, 1]


def _advance_by_products(products, cfg, state, ctx):
  """One weight step of a product-driven estimator (gram_vector, jvp)."""
  dtype = state.simplex_weights.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  request_fn, gradient_fn = _PRODUCT_CRITERIA[cfg.criterion]
  key, probe_key = prng.split(state.key)
  request = request_fn(cfg, state, ctx, acc)
  derivs, probe, sub = products(cfg, state, ctx, request, probe_key, acc)
  scale, shape, top = _spread(state, probe, acc)
  unit = _unit(scale, request.fallback)
  out = gradient_fn(cfg, request, derivs, unit)
  curvature = out.factor * top * (scale / unit) ** 2
  state = state._replace(
      estimator_state=sub._replace(spread_shape=shape.astype(dtype)))
  return _stepped(cfg, state, out.grad, curvature, out.multiplier, scale, key,
                  dtype)


# --------------------------------------------------------------------------
# Random directions, two point (§2.3): criterion values at w +- mu u_k.


def _mgda_values(cfg, state, ctx, dirs, mu, acc):
  """``Phi(w + t u) = ||g_w + t J^T u||**2 / 2`` from one Gram matrix."""
  del cfg, state
  ju = ctx.vjp_many(dirs)
  gram, r = _gram([ctx.direction] + _unstack(ju, len(dirs)))
  base_w, dd, cross = gram[0, 0], jnp.diagonal(gram)[1:], gram[0, 1:]
  phi0 = 0.5 * base_w
  plus = 0.5 * (base_w + 2 * mu * cross + mu * mu * dd)
  minus = 0.5 * (base_w - 2 * mu * cross + mu * mu * dd)
  return phi0, plus, minus, r, jnp.zeros((), acc)   # values in r**2 units


def _cagrad_values(cfg, state, ctx, dirs, mu, acc):
  """CAGrad's dual ``F(w + t u) = g_w'^T g0 + c ||g0|| ||g_w'||``."""
  w = state.simplex_weights.astype(acc)
  ju = _unstack(ctx.vjp_many(jnp.concatenate([w[None], dirs])),
                len(dirs) + 1)
  g0 = _cagrad_mean_gradient(cfg, state, ctx, ju[0], acc)
  gram, r = _gram([g0, ju[0]] + ju[1:])           # [g0, g_w, J^T u_k]
  cc = jnp.asarray(cfg.c, acc)
  n0 = jnp.sqrt(jnp.maximum(gram[0, 0], 0.0))

  def f(t):
    linear = gram[0, 1] + t * gram[0, 2:]
    sq = gram[1, 1] + 2 * t * gram[1, 2:] + t * t * jnp.diagonal(gram)[2:]
    return linear + cc * n0 * jnp.sqrt(jnp.maximum(sq, 0.0))
  norm_w = jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
  phi0 = gram[0, 1] + cc * n0 * norm_w
  return phi0, f(mu), f(-mu), r, _cagrad_multiplier(cfg, n0, norm_w)


def _lookahead_values(cfg, state, ctx, dirs, mu, acc):
  """``Phi(w + t u) = mean_i L_i(theta - alpha (g_w + t J^T u))``."""
  del state
  ju = _unstack(ctx.vjp_many(dirs), len(dirs))
  alpha = jnp.asarray(cfg.lookahead_lr, acc)

  def phi(t, k):
    g = ctx.direction if k is None else _axpy(t, ju[k], ctx.direction)
    return jnp.mean(jnp.asarray(ctx.loss_fn(_axpy(
        -alpha, g, ctx.params))).astype(acc))
  plus = jnp.stack([phi(mu, k) for k in range(len(dirs))])
  minus = jnp.stack([phi(-mu, k) for k in range(len(dirs))])
  return phi(0.0, None), plus, minus, jnp.ones((), acc), jnp.zeros((), acc)


_VALUE_CRITERIA = {"mgda": _mgda_values, "cagrad": _cagrad_values,
                   "lookahead": _lookahead_values}


def _unstack(vectors, num):
  return [jax.tree.map(lambda x, i=i: x[i], vectors) for i in range(num)]


def _advance_two_point(cfg, state, ctx):
  dtype = state.simplex_weights.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  mu = jnp.asarray(cfg.radius, acc)
  key, sub = prng.split(state.key)
  q = cfg.num_directions
  dirs = _random_tangent(sub, cfg.num_tasks, q, acc)    # (q, K)
  phi0, plus, minus, units, lam = _VALUE_CRITERIA[cfg.criterion](
      cfg, state, ctx, dirs, mu, acc)
  factor = (cfg.num_tasks - 1) / q
  slopes = (plus - minus) / (2 * mu)
  grad_n = factor * slopes @ dirs                   # in units**2
  trace_n = jnp.maximum(factor * jnp.sum(plus - 2 * phi0 + minus) /
                        (mu * mu), 0.0)
  # Running trace, kept as a norm in raw units: sqrt(trace) * units.
  scale = _ema_norm(state.scale.astype(acc), jnp.sqrt(trace_n) * units,
                    _CURVATURE_DECAY)
  unit = jnp.where(scale > 0, scale, 1.0)
  return _stepped(cfg, state, grad_n * (units / unit) ** 2,
                  (scale / unit) ** 2, lam, scale, key, dtype)


# --------------------------------------------------------------------------
# Random directions, one-point residual feedback (MGDA).


def _advance_residual_feedback(cfg, state, ctx):
  dtype = state.simplex_weights.dtype
  acc = jnp.promote_types(dtype, jnp.float32)
  mu = jnp.asarray(cfg.radius, acc)
  sub = state.estimator_state
  now = _norm(ctx.direction)                       # ||J^T (w + mu u)||
  before = sub.previous.astype(acc)
  peak = jnp.maximum(now, before)
  safe = jnp.where(peak > 0, peak, 1.0)
  a2, b2 = (now / safe) ** 2, (before / safe) ** 2
  # (Phi_t - Phi_{t-1}) / mu relative to (Phi_t + Phi_{t-1}): scale-free.
  delta = _safe_div(a2 - b2, a2 + b2) / mu
  first = state.count == 0
  delta = jnp.where(first, 0.0, delta)
  scale = jnp.where(first, state.scale.astype(acc), _ema_norm(
      state.scale.astype(acc), jnp.abs(delta), _CURVATURE_DECAY))
  grad = delta * sub.direction.astype(acc)
  key, subkey = prng.split(state.key)
  direction = _random_tangent(subkey, cfg.num_tasks, 1, acc)[0]
  state = state._replace(estimator_state=ResidualFeedbackState(
      direction.astype(dtype), now.astype(dtype)))
  return _stepped(cfg, state, grad, jnp.maximum(scale, jnp.abs(delta)),
                  jnp.zeros((), acc), scale, key, dtype, direction)


# --------------------------------------------------------------------------
# Composition: an estimator is its sub-state, its advance and its needs.


class _Estimator(NamedTuple):
  # (num_tasks, dtype, key) -> (sub-state, key)
  init: Callable[[int, Any, jax.Array], tuple[Any, jax.Array]]
  advance: Callable[[_Config, MarigoldState, _Context], MarigoldState]
  needs_loss_fn: Callable[[_Config, bool], bool]
  base_losses: bool   # whether l(theta) is computed when not given


def _gram_vector_init(num_tasks, dtype, key):
  return GramVectorState(jnp.zeros((num_tasks, num_tasks), dtype),
                         jnp.ones((), dtype)), key


def _jvp_init(num_tasks, dtype, key):
  return JvpState(jnp.zeros((num_tasks, num_tasks), dtype)), key


def _residual_feedback_init(num_tasks, dtype, key):
  key, sub = prng.split(key)
  direction = _random_tangent(sub, num_tasks, 1, dtype)[0]
  return ResidualFeedbackState(direction, jnp.zeros((), dtype)), key


_GRAM_VECTOR = _Estimator(
    _gram_vector_init,
    functools.partial(_advance_by_products, _finite_difference_products),
    lambda cfg, stacked: True, True)
_JVP = _Estimator(
    _jvp_init,
    functools.partial(_advance_by_products, _jvp_products),
    lambda cfg, stacked: True, True)
_TWO_POINT = _Estimator(
    lambda num_tasks, dtype, key: (optax.EmptyState(), key),
    _advance_two_point,
    lambda cfg, stacked: cfg.criterion == "lookahead" or not stacked, False)
_RESIDUAL_FEEDBACK = _Estimator(
    _residual_feedback_init, _advance_residual_feedback,
    lambda cfg, stacked: False, False)


def _estimator(estimator: str, residual_feedback: bool) -> _Estimator:
  if estimator == "random_directions":
    return _RESIDUAL_FEEDBACK if residual_feedback else _TWO_POINT
  return {"gram_vector": _GRAM_VECTOR, "jvp": _JVP}[estimator]


# --------------------------------------------------------------------------
# The transformation.


def _checked_shape(loss_fn, num_tasks):
  """``loss_fn`` that raises at trace time unless it returns ``(K,)`` losses
  (a scalar would broadcast silently, K + 1 losses fail deep inside)."""
  def checked(p):
    losses = loss_fn(p)
    if jnp.shape(losses) != (num_tasks,):
      raise ValueError(
          f"{_METHOD}: loss_fn returned shape {tuple(jnp.shape(losses))}, "
          f"expected ({num_tasks},): one loss per task, num_tasks="
          f"{num_tasks}.")
    return losses
  return checked


def _random_tangent(key, num_tasks, num, dtype):
  """``num`` random unit vectors of ``{sum = 0}`` in R^K (zeros for K = 1)."""
  z = prng.normal(key, (num, num_tasks), dtype)
  z = z - jnp.mean(z, axis=1, keepdims=True)
  norms = jnp.sqrt(jnp.sum(z * z, axis=1, keepdims=True))
  return jnp.where(norms > 0, z / jnp.where(norms > 0, norms, 1.0), 0.0)


def _init(cfg, estimator, seed, params):
  dtype = base.state_dtype(params)
  num_tasks = cfg.num_tasks
  w = base.uniform_weights(num_tasks, dtype)
  zero = jnp.zeros((), dtype)
  sub, key = estimator.init(num_tasks, dtype, jax.random.PRNGKey(seed))
  criterion_state = (CAGradCriterionState(zero) if cfg.criterion == "cagrad"
                     else optax.EmptyState())
  first = _coefficients(cfg, w, zero, getattr(sub, "direction", None))
  return MarigoldState(first, first, w, jnp.zeros((num_tasks,), dtype), zero,
                       zero, jnp.zeros((), jnp.int32), key, sub,
                       criterion_state)


def _context(cfg, estimator, updates, direction, params, task_losses,
             loss_fn, stacked, acc):
  """The caller's gradient ``g_c``, ``l(theta)`` and the VJPs the estimators
  may take (stacked: weighted sums of the given gradients)."""
  def vjp_many(cotangents):
    if stacked:
      return jax.vmap(lambda v: tree_math.weighted_task_sum(v, updates))(
          cotangents)
    losses, vjp_fn = jax.vjp(loss_fn, params)
    return jax.vmap(lambda v: vjp_fn(v.astype(
        jnp.asarray(losses).dtype))[0])(cotangents)

  def vjp(v):
    return jax.tree.map(lambda x: x[0], vjp_many(v[None]))

  # l(theta): the base of forward differences (the probe's always) and of
  # the look-ahead drop.
  if task_losses is not None:
    base_losses = jnp.asarray(task_losses).astype(acc)
  elif estimator.base_losses:
    base_losses = jnp.asarray(loss_fn(params)).astype(acc)
  else:
    base_losses = jnp.zeros((cfg.num_tasks,), acc)
  return _Context(params, loss_fn, base_losses, direction, vjp, vjp_many,
                  _num_params(params))


def _compute(cfg, estimator, update_every, updates, state, params,
             task_losses, loss_fn, stacked):
  acc = jnp.promote_types(state.simplex_weights.dtype, jnp.float32)
  direction = (tree_math.weighted_task_sum(state.next_weights, updates)
               if stacked else updates)
  ctx = _context(cfg, estimator, updates, direction, params, task_losses,
                 loss_fn, stacked, acc)

  def advanced(s):
    return estimator.advance(cfg, s, ctx)

  if update_every > 1:
    new_state = jax.lax.cond(state.count % update_every == 0, advanced,
                             lambda s: s, state)
  else:
    new_state = advanced(state)
  # weights: the coefficients of the update returned now (the caller's
  # gradient was taken with them); next_weights: those of the next step.
  new_state = new_state._replace(weights=state.next_weights,
                                 count=optax.safe_increment(state.count))
  losses_ok = jnp.all(jnp.isfinite(ctx.base_losses))
  finite = losses_ok & base.all_finite(direction) & base.all_finite(new_state)
  out = direction if task_losses is None else base.nan_unless(losses_ok,
                                                              direction)
  return out, new_state, finite


def _step(cfg, estimator, update_every, updates, state, params, extra_args,
          stacked):
  """One update after the builder's checks: ``(update, new_state,
  finite)``."""
  task_losses = extra_args.get("task_losses")
  loss_fn = extra_args.get("loss_fn")
  if estimator.needs_loss_fn(cfg, stacked):
    validation.check_loss_fn(loss_fn, _METHOD)
    loss_fn = _checked_shape(base.guard_loss_fn(loss_fn, params, _METHOD),
                             cfg.num_tasks)
  else:
    loss_fn = None
  return _compute(cfg, estimator, update_every, updates, state, params,
                  task_losses, loss_fn, stacked)


def _probed_state(state, extra_args):
  """The probe reads ``weights``: the coefficients of this step's loss."""
  del extra_args
  return state._replace(weights=state.next_weights)


def _checked_arguments(criterion, estimator, difference, update_every,
                       num_directions, seed, residual_feedback,
                       hyper_parameters, rescale, radius, radius_tolerance):
  """Trace-time checks of :func:`marigold`'s arguments; the static ints."""
  for name, value, allowed in (("criterion", criterion, CRITERIA),
                               ("estimator", estimator, ESTIMATORS),
                               ("difference", difference, DIFFERENCES)):
    if value not in allowed:
      raise ValueError(f"{_METHOD}: {name} must be one of {allowed}, got "
                       f"{value!r}.")
  # None defaults keep these static under optax.inject_hyperparams.
  statics = []
  for name, value, default in (("update_every", update_every, 1),
                               ("num_directions", num_directions, 4),
                               ("seed", seed, 0)):
    value = default if value is None else value
    if isinstance(value, (jax.Array, jax.core.Tracer)):
      raise TypeError(f"{_METHOD}: {name} must be a static Python int; with "
                      f"optax.inject_hyperparams pass static_args=('{name}',"
                      " ...).")
    statics.append(int(value))
  if statics[0] < 1 or statics[1] < 1:
    raise ValueError(f"{_METHOD}: update_every and num_directions must be "
                     ">= 1.")
  if residual_feedback and (estimator != "random_directions" or
                            criterion != "mgda"):
    raise ValueError(
        f"{_METHOD}: residual_feedback is the one-point variant of "
        "estimator='random_directions' for criterion='mgda' (the only "
        "criterion whose value the caller's gradient gives for free).")
  for name, value in hyper_parameters.items():
    validation.check_nonnegative(value, name, _METHOD)
  if validation.is_concrete(rescale) and int(rescale) not in (0, 1, 2):
    raise ValueError(f"{_METHOD}: rescale must be 0, 1 or 2, got {rescale!r}.")
  validation.check_nonnegative(radius, "radius", _METHOD)
  if radius_tolerance is not None:
    validation.check_nonnegative(radius_tolerance, "radius_tolerance", _METHOD)
  return statics


@deprecation.renamed_arguments(step_size="learning_rate", ema="decay",
                               period="update_every")
def marigold(num_tasks: int, criterion: str = "mgda",
             estimator: str = "gram_vector", learning_rate: float = 0.5,
             radius: Optional[float] = None, c: float = 0.4,
             rescale: int = 1, lookahead_lr: float = 0.1, decay: float = 0.0,
             update_every: Optional[int] = None,
             num_directions: Optional[int] = None,
             residual_feedback: bool = False, difference: str = "forward",
             radius_tolerance: Optional[float] = 1e-2,
             seed: Optional[int] = None) -> base.LossWeightingTransformation:
  """MARIGOLD: task weights by a zeroth-order single-loop bi-level method.

  Chen et al., "Feed m Birds with One Scone", arXiv:2603.07389 (2026): the
  balancing problem ``min_{w in simplex} Phi(w; theta)`` (lower level) is
  advanced by one projected step per training step on a gradient estimated
  from function values only, and the model (upper level) steps along ``g_c =
  J^T c`` from ONE backward pass of ``sum_i c_i L_i``. Only the abstract is
  public; the criteria, estimators and step rule are our reading (module
  docstring): ``w <- P(w - learning_rate * grad_Phi / curvature)``,
  ``grad_Phi = G w`` (MGDA), ``G b + lambda G w`` (CAGrad) or ``-alpha J grad
  Lbar(theta - alpha g_w)`` (look-ahead), with ``G v ~ [l(theta) - l(theta - mu
  J^T v)] / mu`` (``estimator='jvp'``: ``G v = jvp(loss_fn, (theta,), (J^T
  v,))``, exactly). The update returned is ``g_c`` (scale of ``g0``).

  .. math::

     w &\\leftarrow P_\\Delta\\Big( w - \\eta \\frac{\\nabla \\Phi(w)}
     {\\operatorname{tr} \\nabla^2 \\Phi} \\Big), \\qquad
     \\nabla \\Phi = G w \\;\\text{(MGDA)}, \\\\
     G v &\\approx \\frac{\\ell(\\theta) - \\ell(\\theta - \\mu J^\\top v)}{\\mu}, \\qquad
     d = J^\\top c = \\nabla_\\theta \\sum_i c_i L_i

  Use on the single-backward path: ``losses, grads =
  mo.value_and_weighted_grad(fn, tx)(state, params, ...)`` then
  ``tx.update(grads, state, params, task_losses=losses, loss_fn=...)``.
  Stacked per-task gradients are accepted too and combined as ``sum_i c_i
  g_i``. The static ints default to None so that ``optax.inject_hyperparams``
  leaves them static when not given; pass ``static_args=('num_tasks',
  'update_every', ...)`` for those you set.

  Args:
    num_tasks: number of tasks K (static).
    criterion: ``'mgda'``, ``'cagrad'`` or ``'lookahead'``.
    estimator: ``'gram_vector'`` (default; §2.4: Gram-vector products from
      look-ahead losses), ``'random_directions'`` (§2.3: zeroth order in
      weight space) or ``'jvp'`` (the Gram-vector products exactly, by one
      forward-mode pass of ``loss_fn``; no radius).
    learning_rate: dimensionless weight step ``beta`` (stable below 2;
      formerly ``step_size``). Injectable.
    radius: finite-difference radius: RMS displacement per parameter of the
      look-ahead points (gram_vector, default 1e-3; the starting value when
      ``radius_tolerance`` is set), or the weight perturbation
      (random_directions, default 1e-2); unused by jvp. Injectable.
    c: CAGrad's ball radius (criterion ``'cagrad'``). Injectable.
    rescale: CAGrad's output scaling, 0, 1 or 2 as in
      :func:`mtl_optax.cagrad`.
    lookahead_lr: ``alpha``, the virtual SGD step of the look-ahead criterion.
      Injectable.
    decay: optax-style decay of the EMA of the normalised weight-gradient
      estimates, ``new = decay * old + (1 - decay) * estimate`` (0: no
      averaging; formerly ``ema``, same meaning). Injectable.
    update_every: advance the weights every ``update_every`` steps
      (``lax.cond``); the look-ahead passes run only then (static int;
      default 1; formerly ``period``).
    num_directions: ``q``, random directions per step (random_directions;
      static int; default 4).
    residual_feedback: one-point residual feedback instead of two-point
      (random_directions and criterion ``'mgda'`` only; no extra pass).
    difference: ``'forward'`` or ``'central'`` differences (gram_vector).
    radius_tolerance: target relative error of the finite differences
      (gram_vector): the radius is halved while the checked error exceeds it
      and doubled while rounding error would (see the module docstring).
      None keeps ``radius`` fixed. Injectable.
    seed: seed of the PRNG key in the state (static int; default 0).

  Returns:
    A :class:`~mtl_optax.LossWeightingTransformation` with
    :class:`MarigoldState`; ``mo.value_and_weighted_grad`` weights the losses
    with ``state.next_weights`` (``state.weights`` are the coefficients of
    the update just returned).

  Example (linear task losses, ``theta`` frozen: the weights converge to
  MGDA's, here 0.6 and 0.4 for TorchJD's matrix J = [[-4, 1, 1], [6, 1, 1]];
  ``estimator='jvp'`` gives the same):
    >>> import jax, jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> loss_fn = lambda theta: jac @ theta
    >>> tx = mo.marigold(2)
    >>> theta = jnp.zeros(3)
    >>> def step(state, _):
    ...   losses, grad = mo.value_and_weighted_grad(loss_fn, tx)(state, theta)
    ...   return tx.update(grad, state, theta, task_losses=losses,
    ...                    loss_fn=loss_fn)[1], None
    >>> state, _ = jax.lax.scan(step, tx.init(theta), None, length=30)
    >>> print(np.asarray(state.weights, np.float64).round(4))
    [0.6 0.4]
  """
  num_tasks = validation.check_num_tasks(num_tasks, _METHOD)
  update_every, num_directions, seed = _checked_arguments(
      criterion, estimator, difference, update_every, num_directions, seed,
      bool(residual_feedback), {"learning_rate": learning_rate, "c": c,
                                "decay": decay, "lookahead_lr": lookahead_lr},
      rescale, 1.0 if radius is None else radius, radius_tolerance)
  if radius is None:
    radius = 1e-2 if estimator == "random_directions" else 1e-3
  cfg = _Config(num_tasks, criterion, learning_rate, radius, c, rescale,
                lookahead_lr, decay, num_directions, bool(residual_feedback),
                difference == "central", radius_tolerance)
  parts = _estimator(estimator, bool(residual_feedback))
  return base.guarded_transformation(
      num_tasks, _METHOD, functools.partial(_init, cfg, parts, seed),
      functools.partial(_step, cfg, parts, update_every),
      accepts_unstacked=True, probe=_probed_state,
      requires_params="the look-ahead points are displacements of params")
