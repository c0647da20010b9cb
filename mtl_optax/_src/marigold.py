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

Everything else is our design: the criteria's exact forms, both estimators, the step-size rule,
the finite-difference radius, the EMA, the update period and every default.
Re-check them against the paper when its text becomes available.

**The method (our reading).** ``w`` lives on the simplex and is advanced by
one projected step per training step (single loop, warm started):
``w <- P_simplex(w - beta * grad_Phi(w) / curvature)``. The model step is
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
  steps, is not implemented: ``period`` already spaces out all the extra
  work.) Note ``grad F(w) = G c`` with ``c`` the effective coefficients.
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

**Step size (our design).** ``beta = step_size`` is dimensionless: the
estimated gradient is divided by an estimate of the largest curvature of the
criterion on the simplex's tangent space, which makes projected gradient
stable for ``beta < 2`` and invariant to the scale of the losses. For
gram_vector that curvature is the top eigenvalue of ``P G P`` (``P`` the
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

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = ("marigold", "MarigoldState", "gram_vector_product",
           "CRITERIA", "ESTIMATORS")

CRITERIA = ("mgda", "cagrad", "lookahead")
ESTIMATORS = ("gram_vector", "random_directions")
DIFFERENCES = ("forward", "central")

# Decay of the running curvature-trace estimate (the probe is a single
# Rademacher direction; 0.9 averages about 19 of them).
_CURVATURE_DECAY = 0.9
_METHOD = "marigold"


class MarigoldState(NamedTuple):
  """State of :func:`marigold`.

  Attributes:
    weights: ``(K,)`` coefficients ``c`` of the last update (``update =
      sum_i c_i g_i``, the gradient of ``sum_i c_i L_i``): ``w`` for the MGDA
      and look-ahead criteria, ``(1/K + lambda w) / s`` for CAGrad, ``w + mu
      u`` with residual feedback.
    next_weights: ``(K,)`` the coefficients of the caller's next weighted
      loss (what ``mo.value_and_weighted_grad`` uses): ``weights`` after this step's
      advance of ``w``.
    simplex_weights: ``(K,)`` the balancing variable ``w`` on the simplex.
    gradient_ema: ``(K,)`` EMA (decay ``ema``) of the normalised step
      direction ``grad_Phi / curvature``.
    scale: ``()`` square root of the running estimate of the curvature trace
      (gram_vector: of ``tr P G P``); residual feedback: RMS of the
      normalised differences.
    spread_shape: ``(K, K)`` gram_vector: the running estimate of ``P G P``
      divided by its trace (from the probe); its top eigenvalue times
      ``scale**2`` is the curvature the weight step is divided by.
    multiplier: ``()`` CAGrad's ``lambda`` in ``weights`` (0 otherwise).
    radius_scale: ``()`` factor on ``radius`` set by the finite-difference
      error control (``radius_tolerance``; 1 without it).
    residual: ``()`` length of the last weight step divided by
      ``step_size`` (0 at the estimated optimum).
    direction: ``(K,)`` residual feedback's current perturbation ``u``.
    previous: ``()`` residual feedback's previous ``||g_c||``.
    count: ``()`` number of ``update`` calls.
    key: PRNG key (probe and random directions).
  """
  weights: jax.Array
  next_weights: jax.Array
  simplex_weights: jax.Array
  gradient_ema: jax.Array
  scale: jax.Array
  spread_shape: jax.Array
  multiplier: jax.Array
  radius_scale: jax.Array
  residual: jax.Array
  direction: jax.Array
  previous: jax.Array
  count: jax.Array
  key: jax.Array


base.register_loss_weighting_state(MarigoldState)


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
  leaves = jax.tree.leaves(stacked)
  dtype = tree_math.accumulation_dtype(stacked)
  peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(dtype)
                            for x in leaves]))
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


# --------------------------------------------------------------------------
# Zeroth-order primitives.


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
  and diagnostics; :func:`marigold` uses the same estimate inside ``update``.

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
# The transformation.


def _stacked(updates, params, num_tasks) -> bool:
  """Whether ``updates`` are stacked per-task gradients (clear errors else)."""
  if params is None:
    raise ValueError(f"{_METHOD}: update needs params (the look-ahead points "
                     "are displacements of params).")
  u_leaves, p_leaves = jax.tree.leaves(updates), jax.tree.leaves(params)
  if len(u_leaves) == len(p_leaves) and all(
      jnp.shape(u) == jnp.shape(p) for u, p in zip(u_leaves, p_leaves)):
    return False
  validation.check_task_axis(updates, num_tasks, _METHOD)
  if len(u_leaves) != len(p_leaves) or not all(
      jnp.shape(u)[1:] == jnp.shape(p) for u, p in zip(u_leaves, p_leaves)):
    raise ValueError(
        f"{_METHOD}: updates are neither one gradient shaped like params nor "
        f"stacked per-task gradients (leading axis {num_tasks}) over params.")
  return True


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
  z = jax.random.normal(key, (num, num_tasks), dtype)
  z = z - jnp.mean(z, axis=1, keepdims=True)
  norms = jnp.sqrt(jnp.sum(z * z, axis=1, keepdims=True))
  return jnp.where(norms > 0, z / jnp.where(norms > 0, norms, 1.0), 0.0)


def marigold(num_tasks: int, criterion: str = "mgda",
             estimator: str = "gram_vector", step_size: float = 0.5,
             radius: Optional[float] = None, c: float = 0.4,
             rescale: int = 1, lookahead_lr: float = 0.1, ema: float = 0.0,
             period: Optional[int] = None,
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
  docstring): ``w <- P(w - step_size * grad_Phi / tr_Hessian)``,
  ``grad_Phi = G w`` (MGDA), ``G b + lambda G w`` (CAGrad) or ``-alpha J grad
  Lbar(theta - alpha g_w)`` (look-ahead), with ``G v ~ [l(theta) - l(theta - mu
  J^T v)] / mu``. The update returned is ``g_c`` (scale of ``g0``).

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
  'period', ...)`` for those you set.

  Args:
    num_tasks: number of tasks K (static).
    criterion: ``'mgda'``, ``'cagrad'`` or ``'lookahead'``.
    estimator: ``'gram_vector'`` (§2.4: Gram-vector products from look-ahead
      losses) or ``'random_directions'`` (§2.3: zeroth order in weight space).
    step_size: dimensionless weight step ``beta`` (stable below 2).
      Injectable.
    radius: finite-difference radius: RMS displacement per parameter of the
      look-ahead points (gram_vector, default 1e-3; the starting value when
      ``radius_tolerance`` is set), or the weight perturbation
      (random_directions, default 1e-2). Injectable.
    c: CAGrad's ball radius (criterion ``'cagrad'``). Injectable.
    rescale: CAGrad's output scaling, 0, 1 or 2 as in
      :func:`mtl_optax.cagrad`.
    lookahead_lr: ``alpha``, the virtual SGD step of the look-ahead criterion.
      Injectable.
    ema: decay of the EMA of the normalised weight-gradient estimates (0: no
      averaging). Injectable.
    period: advance the weights every ``period`` steps (``lax.cond``); the
      look-ahead passes run only then (static int; default 1).
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
  MGDA's, here 0.6 and 0.4 for TorchJD's matrix J = [[-4, 1, 1], [6, 1, 1]]):
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
  if criterion not in CRITERIA:
    raise ValueError(f"{_METHOD}: criterion must be one of {CRITERIA}, got "
                     f"{criterion!r}.")
  if estimator not in ESTIMATORS:
    raise ValueError(f"{_METHOD}: estimator must be one of {ESTIMATORS}, got "
                     f"{estimator!r}.")
  if difference not in DIFFERENCES:
    raise ValueError(f"{_METHOD}: difference must be one of {DIFFERENCES}, "
                     f"got {difference!r}.")
  # None defaults keep these static under optax.inject_hyperparams.
  period = 1 if period is None else period
  num_directions = 4 if num_directions is None else num_directions
  seed = 0 if seed is None else seed
  for name, value in (("period", period), ("num_directions", num_directions),
                      ("seed", seed)):
    if isinstance(value, (jax.Array, jax.core.Tracer)):
      raise TypeError(f"{_METHOD}: {name} must be a static Python int; with "
                      f"optax.inject_hyperparams pass static_args=('{name}',"
                      " ...).")
  period, num_directions, seed = int(period), int(num_directions), int(seed)
  if period < 1 or num_directions < 1:
    raise ValueError(f"{_METHOD}: period and num_directions must be >= 1.")
  residual_feedback = bool(residual_feedback)
  if residual_feedback and (estimator != "random_directions" or
                            criterion != "mgda"):
    raise ValueError(
        f"{_METHOD}: residual_feedback is the one-point variant of "
        "estimator='random_directions' for criterion='mgda' (the only "
        "criterion whose value the caller's gradient gives for free).")
  for name, value in (("step_size", step_size), ("c", c), ("ema", ema),
                      ("lookahead_lr", lookahead_lr)):
    validation.check_nonnegative(value, name, _METHOD)
  if validation.is_concrete(rescale) and int(rescale) not in (0, 1, 2):
    raise ValueError(f"{_METHOD}: rescale must be 0, 1 or 2, got {rescale!r}.")
  if radius is None:
    radius = 1e-3 if estimator == "gram_vector" else 1e-2
  validation.check_nonnegative(radius, "radius", _METHOD)
  if radius_tolerance is not None:
    validation.check_nonnegative(radius_tolerance, "radius_tolerance", _METHOD)
  central = difference == "central"
  gram_vector = estimator == "gram_vector"

  def divisor(dtype):
    c_ = jnp.asarray(c, dtype)
    r = jnp.asarray(rescale)
    return jnp.where(r == 1, 1.0 + c_ * c_, jnp.where(r == 2, 1.0 + c_, 1.0))

  def coefficients(w, lam, direction):
    if criterion == "cagrad":
      return (1.0 / num_tasks + lam * w) / divisor(w.dtype)
    if residual_feedback:
      return w + jnp.asarray(radius, w.dtype) * direction
    return w

  def init_fn(params):
    dtype = base.state_dtype(params)
    w = base.uniform_weights(num_tasks, dtype)
    zero = jnp.zeros((), dtype)
    key = jax.random.PRNGKey(seed)
    direction = jnp.zeros((num_tasks,), dtype)
    if residual_feedback:
      key, sub = jax.random.split(key)
      direction = _random_tangent(sub, num_tasks, 1, dtype)[0]
    first = coefficients(w, zero, direction)
    return MarigoldState(first, first, w,
                         jnp.zeros((num_tasks,), dtype), zero,
                         jnp.zeros((num_tasks, num_tasks), dtype), zero,
                         jnp.ones((), dtype), zero, direction, zero,
                         jnp.zeros((), jnp.int32), key)

  # ---- the weight step, shared by every estimator -------------------------

  def take_step(state, grad, curvature):
    """``w <- P(w - beta * EMA(grad / curvature))``, steps capped at beta."""
    dtype = state.simplex_weights.dtype
    grad = _centre(grad.astype(dtype))
    curvature = curvature.astype(dtype)
    denom = jnp.maximum(curvature, _vector_norm(grad))
    normalised = _safe_div(grad, denom)
    decay = jnp.asarray(ema, dtype)
    momentum = decay * state.gradient_ema + (1 - decay) * normalised
    w = state.simplex_weights
    beta = jnp.asarray(step_size, dtype)
    new_w = solvers.project_to_simplex(w - beta * momentum)
    residual = _safe_div(_vector_norm(new_w - w), beta)
    return new_w, momentum, residual

  # ---- gram_vector (§2.4) -------------------------------------------------

  def advance_gram_vector(state, ctx):
    dtype = state.simplex_weights.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    w = state.simplex_weights.astype(acc)
    rad = jnp.asarray(radius, acc) * state.radius_scale.astype(acc)
    root_n = math.sqrt(ctx.num_params)
    displacement = rad * root_n
    key, probe_key = jax.random.split(state.key)
    c_now = state.next_weights.astype(acc)
    checks = []

    def deriv(direction, norm, exact=None, scale_d=None):
      """J x / ||x||; with ``exact = <g_c, x / ||x||>`` (known exactly, as
      ``c . J x = <J^T c, x>``) also records the finite-difference error."""
      out, noise = _directional_derivatives(
          ctx.loss_fn, ctx.params, ctx.base_losses, direction, norm,
          displacement, central, acc)
      if exact is not None:
        checks.append((_safe_div(jnp.abs(c_now @ out - exact), scale_d),
                       _safe_div(jnp.abs(c_now) @ noise, scale_d)))
      return out

    # Curvature: an EMA of the probe's outer products estimates P G P. It is
    # kept as its trace (scale**2, in raw units, as a norm for range) and its
    # trace-one shape; the step uses the shape's top eigenvalue.
    probe = _probe(ctx.loss_fn, ctx.params, ctx.base_losses, probe_key, rad,
                   ctx.num_params, acc)
    spread = _vector_norm(probe)
    old_scale = state.scale.astype(acc)
    scale = _ema_norm(old_scale, spread, _CURVATURE_DECAY)
    keep = jnp.where(old_scale == 0, 0.0, _CURVATURE_DECAY * _safe_div(
        old_scale, scale) ** 2)
    add = jnp.where(old_scale == 0, 1.0, (1 - _CURVATURE_DECAY) * _safe_div(
        spread, scale) ** 2)
    direction = _safe_div(probe, spread)
    shape = (keep * state.spread_shape.astype(acc) +
             add * jnp.outer(direction, direction))
    top = solvers.largest_eigenvalue(shape)   # in (0, 1]: 1 for rank one
    lam = jnp.zeros((), acc)

    if criterion == "mgda":
      norm_d = _norm(ctx.direction)
      unit = jnp.where(scale > 0, scale, jnp.where(norm_d > 0, norm_d, 1.0))
      jd = deriv(ctx.direction, norm_d, norm_d, norm_d)
      grad = (norm_d / unit) * (jd / unit)                  # G w / unit**2
      curvature = top * (scale / unit) ** 2
    elif criterion == "cagrad":
      g_w = ctx.vjp(w)
      s = divisor(acc)
      g0 = _axpy(-state.multiplier.astype(acc), g_w,
                 _scale_tree(s, ctx.direction))            # s g_c - lam g_w
      gram, r = _gram([g0, g_w])
      norm_0 = r * jnp.sqrt(jnp.maximum(gram[0, 0], 0.0))
      norm_w = r * jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
      unit = jnp.where(scale > 0, scale, jnp.where(r > 0, r, 1.0))
      # g_c = (g0 + lam_t g_w) / s: its norm and <g_c, g_w / ||g_w||>.
      lam_t = state.multiplier.astype(acc)
      coef = jnp.stack([1.0, lam_t]) / s
      norm_c = r * jnp.sqrt(jnp.maximum(coef @ gram @ coef, 0.0))
      dot_cw = r * _safe_div(coef @ gram[:, 1], jnp.sqrt(gram[1, 1]))
      gb = (norm_0 / unit) * (deriv(g0, norm_0) / unit)     # G b / unit**2
      gw = (norm_w / unit) * (deriv(g_w, norm_w, dot_cw, norm_c)
                              / unit)                        # G w / unit**2
      floor = jnp.sqrt(jnp.finfo(acc).eps) * jnp.maximum(norm_0, norm_w)
      lam = jnp.asarray(c, acc) * _safe_div(norm_0, jnp.maximum(norm_w, floor))
      grad = gb + lam * gw
      curvature = lam * top * (scale / unit) ** 2
    else:  # lookahead
      alpha = jnp.asarray(lookahead_lr, acc)
      ahead = _axpy(-alpha, ctx.direction, ctx.params)     # theta - alpha g_w
      ahead_losses, vjp_ahead = jax.vjp(ctx.loss_fn, ahead)
      (g_ahead,) = vjp_ahead(jnp.full(
          (num_tasks,), 1.0 / num_tasks, jnp.asarray(ahead_losses).dtype))
      gram, r = _gram([ctx.direction, g_ahead])
      norm_d = r * jnp.sqrt(jnp.maximum(gram[0, 0], 0.0))
      norm_a = r * jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
      unit = jnp.where(scale > 0, scale, jnp.where(r > 0, r, 1.0))
      dot_da = r * _safe_div(gram[0, 1], jnp.sqrt(gram[1, 1]))
      grad = -(norm_a / unit) * (deriv(g_ahead, norm_a, dot_da, norm_d)
                                 / unit)
      # alpha * kappa, kappa = g_w^T H g_w / ||g_w||^2 of the mean loss, from
      # Lbar(theta) - Lbar(theta') = alpha g0.g_w - alpha^2/2 g_w^T H g_w and
      # g_w . grad Lbar(theta') = g0.g_w - alpha g_w^T H g_w.
      drop = jnp.mean(ctx.base_losses) - jnp.mean(
          jnp.asarray(ahead_losses).astype(acc))
      cross = _safe_div(gram[0, 1], gram[0, 0])             # <d, g'>/||d||^2
      alpha_kappa = 2 * (_safe_div(_safe_div(drop, alpha), norm_d * norm_d)
                         - cross)
      curvature = jnp.maximum(alpha_kappa, 1.0) * top * (scale / unit) ** 2

    new_w, momentum, residual = take_step(state, grad, curvature)
    radius_scale = state.radius_scale
    if radius_tolerance is not None:
      (error, rounding), = checks
      tol = jnp.asarray(radius_tolerance, acc)
      factor = jnp.where(rounding > tol / 2, 2.0,
                         jnp.where(error > tol, 0.5, 1.0))
      radius_scale = jnp.clip(state.radius_scale.astype(acc) * factor,
                              2.0 ** -30, 2.0 ** 10).astype(dtype)
    return state._replace(
        next_weights=coefficients(new_w, lam, state.direction).astype(dtype),
        simplex_weights=new_w.astype(dtype), gradient_ema=momentum,
        scale=scale.astype(dtype), spread_shape=shape.astype(dtype),
        multiplier=lam.astype(dtype), radius_scale=radius_scale,
        residual=residual.astype(dtype), key=key)

  # ---- random directions, two point (§2.3) ---------------------------------

  def advance_two_point(state, ctx):
    dtype = state.simplex_weights.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    w = state.simplex_weights.astype(acc)
    mu = jnp.asarray(radius, acc)
    key, sub = jax.random.split(state.key)
    dirs = _random_tangent(sub, num_tasks, num_directions, acc)   # (q, K)
    q = num_directions
    lam = jnp.zeros((), acc)
    cotangents = dirs if criterion != "cagrad" else jnp.concatenate(
        [w[None], dirs])
    vectors = ctx.vjp_many(cotangents)              # stacked: leaves (m, ...)
    unstack = lambda i: jax.tree.map(lambda x: x[i], vectors)
    ju = [unstack(i) for i in range(len(cotangents))]

    if criterion == "lookahead":
      alpha = jnp.asarray(lookahead_lr, acc)

      def phi(t, k):
        g = ctx.direction if k is None else _axpy(t, ju[k], ctx.direction)
        return jnp.mean(jnp.asarray(ctx.loss_fn(_axpy(
            -alpha, g, ctx.params))).astype(acc))
      phi0 = phi(0.0, None)
      plus = jnp.stack([phi(mu, k) for k in range(q)])
      minus = jnp.stack([phi(-mu, k) for k in range(q)])
      units = jnp.ones((), acc)                       # loss units
    else:
      if criterion == "mgda":
        gram, r = _gram([ctx.direction] + ju)         # [g_w, J^T u_k]
        base_w, dd = gram[0, 0], jnp.diagonal(gram)[1:]
        cross = gram[0, 1:]
        phi0 = 0.5 * base_w
        plus = 0.5 * (base_w + 2 * mu * cross + mu * mu * dd)
        minus = 0.5 * (base_w - 2 * mu * cross + mu * mu * dd)
      else:  # cagrad
        g_w = ju[0]
        s = divisor(acc)
        g0 = _axpy(-state.multiplier.astype(acc), g_w,
                   _scale_tree(s, ctx.direction))
        gram, r = _gram([g0, g_w] + ju[1:])           # [g0, g_w, J^T u_k]
        cc = jnp.asarray(c, acc)
        n0 = jnp.sqrt(jnp.maximum(gram[0, 0], 0.0))

        def f(t):
          linear = gram[0, 1] + t * gram[0, 2:]
          sq = gram[1, 1] + 2 * t * gram[1, 2:] + t * t * jnp.diagonal(
              gram)[2:]
          return linear + cc * n0 * jnp.sqrt(jnp.maximum(sq, 0.0))
        phi0 = gram[0, 1] + cc * n0 * jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
        plus, minus = f(mu), f(-mu)
        norm_w = jnp.sqrt(jnp.maximum(gram[1, 1], 0.0))
        floor = jnp.sqrt(jnp.finfo(acc).eps) * jnp.maximum(n0, norm_w)
        lam = cc * _safe_div(n0, jnp.maximum(norm_w, floor))
      units = r                                       # values in r**2 units
    factor = (num_tasks - 1) / q
    slopes = (plus - minus) / (2 * mu)
    grad_n = factor * slopes @ dirs                   # in units**2
    trace_n = jnp.maximum(factor * jnp.sum(plus - 2 * phi0 + minus) /
                          (mu * mu), 0.0)
    # Running trace, kept as a norm in raw units: sqrt(trace) * units.
    scale = _ema_norm(state.scale.astype(acc), jnp.sqrt(trace_n) * units,
                      _CURVATURE_DECAY)
    unit = jnp.where(scale > 0, scale, 1.0)
    grad = grad_n * (units / unit) ** 2
    curvature = (scale / unit) ** 2
    new_w, momentum, residual = take_step(state, grad, curvature)
    return state._replace(
        next_weights=coefficients(new_w, lam, state.direction).astype(dtype),
        simplex_weights=new_w.astype(dtype), gradient_ema=momentum,
        scale=scale.astype(dtype), multiplier=lam.astype(dtype),
        residual=residual.astype(dtype), key=key)

  # ---- random directions, one-point residual feedback -----------------------

  def advance_residual_feedback(state, ctx):
    dtype = state.simplex_weights.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    mu = jnp.asarray(radius, acc)
    now = _norm(ctx.direction)                       # ||J^T (w + mu u)||
    before = state.previous.astype(acc)
    peak = jnp.maximum(now, before)
    safe = jnp.where(peak > 0, peak, 1.0)
    a2, b2 = (now / safe) ** 2, (before / safe) ** 2
    # (Phi_t - Phi_{t-1}) / mu relative to (Phi_t + Phi_{t-1}): scale-free.
    delta = _safe_div(a2 - b2, a2 + b2) / mu
    first = state.count == 0
    delta = jnp.where(first, 0.0, delta)
    scale = jnp.where(first, state.scale.astype(acc), _ema_norm(
        state.scale.astype(acc), jnp.abs(delta), _CURVATURE_DECAY))
    grad = delta * state.direction.astype(acc)
    new_w, momentum, residual = take_step(
        state, grad, jnp.maximum(scale, jnp.abs(delta)))
    key, sub = jax.random.split(state.key)
    direction = _random_tangent(sub, num_tasks, 1, acc)[0]
    return state._replace(
        next_weights=coefficients(new_w, 0.0, direction).astype(dtype),
        simplex_weights=new_w.astype(dtype), gradient_ema=momentum,
        scale=scale.astype(dtype), residual=residual.astype(dtype),
        direction=direction.astype(dtype), previous=now.astype(dtype),
        key=key)

  if gram_vector:
    advance = advance_gram_vector
  elif residual_feedback:
    advance = advance_residual_feedback
  else:
    advance = advance_two_point

  def needs_loss_fn(stacked):
    if gram_vector:
      return True
    if residual_feedback:
      return False
    return criterion == "lookahead" or not stacked

  def compute(updates, state, params, task_losses, loss_fn, stacked):
    dtype = state.simplex_weights.dtype
    acc = jnp.promote_types(dtype, jnp.float32)
    direction = (tree_math.weighted_task_sum(state.next_weights, updates)
                 if stacked else updates)

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
    elif gram_vector:
      base_losses = jnp.asarray(loss_fn(params)).astype(acc)
    else:
      base_losses = jnp.zeros((num_tasks,), acc)
    ctx = _Context(params, loss_fn, base_losses, direction, vjp, vjp_many,
                   _num_params(params))

    def advanced(s):
      return advance(s, ctx)

    if period > 1:
      new_state = jax.lax.cond(state.count % period == 0, advanced,
                               lambda s: s, state)
    else:
      new_state = advanced(state)
    # weights: the coefficients of the update returned now (the caller's
    # gradient was taken with them); next_weights: those of the next step.
    new_state = new_state._replace(weights=state.next_weights,
                                   count=optax.safe_increment(state.count))

    losses_ok = jnp.all(jnp.isfinite(base_losses))
    finite = losses_ok
    for leaf in jax.tree.leaves(direction):
      finite &= jnp.all(jnp.isfinite(leaf))
    for leaf in jax.tree.leaves(new_state):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        finite &= jnp.all(jnp.isfinite(leaf))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             new_state, state)
    out = direction
    if task_losses is not None:
      out = jax.tree.map(lambda u: jnp.where(losses_ok, u, jnp.nan).astype(
          u.dtype), out)
    return out, new_state

  def update_fn(updates, state, params=None, **extra_args):
    task_losses = extra_args.get("task_losses")
    validation.check_task_losses(task_losses, num_tasks, _METHOD)
    if extra_args.get(base.PROBE_ARG):
      # The probe reads ``weights``: the coefficients of this step's loss.
      return updates, state._replace(weights=state.next_weights)
    stacked = _stacked(updates, params, num_tasks)
    if not jax.tree.leaves(updates):
      return updates, state
    loss_fn = extra_args.get("loss_fn")
    if needs_loss_fn(stacked):
      validation.check_loss_fn(loss_fn, _METHOD)
      loss_fn = _checked_shape(base.guard_loss_fn(loss_fn, params, _METHOD),
                               num_tasks)
    else:
      loss_fn = None
    return compute(updates, state, params, task_losses, loss_fn, stacked)

  return base.loss_weighting_transformation(init_fn, update_fn)




class _Context(NamedTuple):
  params: Any
  loss_fn: Callable[[Any], jax.Array]
  base_losses: jax.Array
  direction: Any          # the caller's gradient g_c = J^T c
  vjp: Callable[[jax.Array], Any]
  vjp_many: Callable[[jax.Array], Any]
  num_params: int
