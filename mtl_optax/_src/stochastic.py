"""Methods built for stochastic gradients: ExcessMTL, SDMGrad, MoDo, MoCo.

* :func:`excess_mtl` -- task weights by exponentiated gradient on estimated
  excess risks (AdaGrad-diagonal curvature, kept in the state).
* :func:`sdmgrad` and :func:`modo` -- weights from a cross-batch matrix
  ``J J'^T`` of two independent mini-batches (an unbiased estimate of the
  Gram matrix of the expected gradients).
* :func:`moco` -- tracked per-task gradients (in the state) and weights on
  them.

Two mini-batches: :func:`sdmgrad` and :func:`modo` accept the extra argument
``second_task_grads``, the stacked task gradients (same tree and leading K as
``updates``) of a second mini-batch drawn independently of the first::

    _, grads = mo.value_and_task_grads(task_losses)(params, batch_1)
    _, grads_2 = mo.value_and_task_grads(task_losses)(params, batch_2)
    updates, state = tx.update(grads, state, params, second_task_grads=grads_2)

The weights are computed from ``A = J J'^T`` (``A[i, j] = <g_i, g'_j>``,
with ``g`` from ``updates`` and ``g'`` from ``second_task_grads``) and the
update is ``sum_i w_i g_i`` along ``updates``. Without
``second_task_grads`` both fall back to the single-batch Gram matrix
``J J^T``: the deterministic method, biased for stochastic gradients (the
papers' guarantees need the independent batch).

The papers also draw the batch the update is taken along independently of
the two that fit the weights (a third batch). That is not supported: the
update is always along ``updates``, the first batch. TorchJD's examples
differ from both: its MoDo example updates along the average
``(losses_1 + losses_2) / 2`` of the two batches, and its SDMGrad example
uses a third batch for the update. For the papers' version, take the
weights from ``state.weights`` and combine a third batch's gradients with
them (``mo.constant(num_tasks, state.weights)``).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtl_optax._src import base
from mtl_optax._src import deprecation
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = [
    "excess_mtl",
    "ExcessMTLState",
    "moco",
    "MoCoState",
    "modo",
    "MoDoState",
    "sdmgrad",
    "SDMGradState",
]



def _capped_step(rate: jax.Array, scale: jax.Array) -> jax.Array:
  """``rate * scale**2``, capped at sqrt(max float).

  Steps on an unnormalised matrix ``A = A_hat * scale**2`` are taken as
  ``rate * scale**2 * A_hat``; for gradients so large that this overflows,
  the projection of the step is already its limit (a vertex), so a finite cap
  gives that limit instead of inf - inf = NaN.
  """
  cap = jnp.sqrt(jnp.finfo(scale.dtype).max)
  return jnp.minimum(rate * scale * scale, cap)


def _weight_matrix(method: str, updates: Any, extra_args: dict,
                   num_tasks: int) -> tuple[jax.Array, jax.Array]:
  """The (normalised) matrix the weights are fitted on, and its scale."""
  second = extra_args.get("second_task_grads")
  if second is None:
    normalized = tree_math.normalized_gram(updates)
    return normalized.gram, normalized.rms_norm
  # Inside optax.partition the extra arguments arrive whole while updates
  # are masked: mask the second batch the same way.
  try:
    second = jax.tree.map(
        lambda u, s: u if isinstance(u, optax.MaskedNode) else s,
        updates, second, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  except (ValueError, TypeError):
    pass  # a structure mismatch is reported below
  validation.check_task_axis(second, num_tasks, method,
                             what="second_task_grads")
  if jax.tree.structure(second) != jax.tree.structure(updates) or any(
      np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(updates),
                                                 jax.tree.leaves(second))):
    raise ValueError(
        f"{method}: second_task_grads must have the same tree and leaf shapes "
        f"as updates, got {jax.tree.map(np.shape, second)} and "
        f"{jax.tree.map(np.shape, updates)}.")
  return tree_math.scaled_cross_gram(updates, second)


def _state_tree(params: Any, num_tasks: int) -> Any:
  """Zeros shaped ``(K, *param.shape)`` in float32 (or wider) per leaf."""
  return jax.tree.map(
      lambda p: jnp.zeros((num_tasks,) + jnp.shape(p),
                          jnp.promote_types(jnp.asarray(p).dtype, jnp.float32)),
      params)


# ----------------------------------------------------------------- ExcessMTL


class ExcessMTLState(NamedTuple):
  """State of :func:`excess_mtl`.

  Attributes:
    weights: ``(K,)`` task weights of the last update (on the simplex).
    count: number of finite steps taken.
    baseline: ``(K,)`` sum of the excess-risk estimates over the warm-up.
    root_sum_sq: per leaf ``(K, *shape)``: ``sqrt(sum_t g_{t,i}^2)``, the
      AdaGrad diagonal of each task (kept as a root so it cannot overflow).
  """
  weights: jax.Array
  count: jax.Array
  baseline: jax.Array
  root_sum_sq: Any


def excess_mtl(num_tasks: int, robust_step_size: float = 1e-2,
               warmup_steps: int = 1) -> optax.GradientTransformationExtraArgs:
  """ExcessMTL: up-weight the tasks furthest from their own optimum.

  He, Zhou, Zhao & Zhang, "Robust Multi-Task Learning with Excess Risks",
  ICML 2024. Each task's excess risk is estimated by a second-order
  expansion with an AdaGrad-diagonal curvature (eqs. 6-7):
  ``e_i = sum_coords g_i^2 / sqrt(S_i)`` with ``S_i = sum_{t<=now} g_{t,i}^2``
  accumulated in the state. During the first ``warmup_steps`` steps the
  weights stay uniform and the estimates are averaged into a baseline
  ``b``; afterwards the weights take an exponentiated-gradient step (eq. 9),
  ``w <- w * exp(eta e / b) / Z``, and ``d = sum_i w_i g_i``. Output scale:
  ``g0`` (weights on the simplex, as TorchJD); the official code and LibMTL
  keep weights summing to K, i.e. K times this update.

  .. math::

     d &= \\sum_i w_i g_i, \\qquad w \\leftarrow \\frac{w \\odot \\exp(\\eta\\, e / b)}{Z},
     \\\\
     e_i &= \\sum_{\\text{coords}} \\frac{g_i^2}{\\sqrt{S_i}}, \\qquad
     S_i = \\sum_{t \\le \\text{now}} g_{t,i}^2

  Deviations, all scale-free choices: no ``1e-7`` inside the square root or
  after the baseline (a coordinate or task with no gradient contributes 0,
  and a task whose warm-up baseline is 0 gets no step); the exponentiated
  step is taken in log space (``softmax(log w + eta e / b)``), which cannot
  overflow. The state holds one ``(K, *shape)`` accumulator per parameter.

  Args:
    num_tasks: number of tasks K.
    robust_step_size: eta (LibMTL's default 1e-2; TorchJD's 1.0). Injectable.
    warmup_steps: steps that only collect the baseline (official code and
      LibMTL: 1; the paper's appendix suggests about three epochs). Static
      int >= 1.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`ExcessMTLState`.

  Example (the second task keeps a larger gradient relative to its history):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.excess_mtl(2, robust_step_size=1.0)
    >>> state = tx.init(jnp.zeros(2))
    >>> for grads in ([[1., 0.], [0., 1.]], [[0.5, 0.], [0., 2.]]):
    ...   update, state = tx.update(jnp.array(grads), state)
    ...   print(np.asarray(state.weights, np.float64).round(4))
    [0.5 0.5]
    [0.1729 0.8271]
  """
  method = "excess_mtl"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive(robust_step_size, "robust_step_size", method)
  if validation.is_concrete(warmup_steps) and int(warmup_steps) < 1:
    raise ValueError(f"{method}: warmup_steps must be >= 1, got "
                     f"{warmup_steps!r}.")

  def init_fn(params):
    dtype = base.state_dtype(params)
    return ExcessMTLState(base.uniform_weights(num_tasks, dtype),
                          jnp.zeros((), jnp.int32),
                          jnp.zeros((num_tasks,), dtype),
                          _state_tree(params, num_tasks))

  def step(updates, state, params, extra_args):
    del params, extra_args
    dtype = state.weights.dtype
    # Gradients near the dtype's largest value overflow the root, the sums
    # and the ratio below: each saturates at the largest finite value
    # instead (every term is non-negative, so no inf - inf arises).
    top = jnp.finfo(dtype).max
    root = jax.tree.map(
        lambda r, g: jnp.minimum(jnp.hypot(r, g.astype(r.dtype)),
                                 jnp.finfo(r.dtype).max),
        state.root_sum_sq, updates)

    def excess(r, g):
      size = jnp.abs(g.astype(r.dtype))
      ratio = jnp.where(r > 0, size / jnp.where(r > 0, r, 1.0), 0.0)
      return tree_math.per_task_sum(size * ratio)

    estimate = sum(jax.tree.leaves(jax.tree.map(excess, root, updates)))
    estimate = jnp.minimum(estimate.astype(dtype), top)
    in_warmup = state.count < warmup_steps
    baseline = jnp.minimum(
        state.baseline + jnp.where(in_warmup, estimate, 0.0), top)
    mean_baseline = baseline / jnp.asarray(warmup_steps, dtype)
    relative = jnp.where(mean_baseline > 0, estimate / jnp.where(
        mean_baseline > 0, mean_baseline, 1.0), 0.0)
    stepped = jax.nn.softmax(jnp.log(state.weights) + jnp.minimum(
        jnp.asarray(robust_step_size, dtype) * relative, top))
    weights = jnp.where(in_warmup, state.weights, stepped)
    return (tree_math.weighted_task_sum(weights, updates),
            ExcessMTLState(weights, state.count + 1, baseline, root))

  return base.guarded_transformation(
      num_tasks, method, init_fn, step)


# ------------------------------------------------------------------- SDMGrad


class SDMGradState(NamedTuple):
  """State of :func:`sdmgrad`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update,
      ``(w + lam / K) / (1 + lam)``.
    simplex_weights: ``(K,)`` the inner solution ``w`` (warm start).
  """
  weights: jax.Array
  simplex_weights: jax.Array


@deprecation.renamed_arguments(lr="learning_rate", num_iters="max_iter")
def sdmgrad(num_tasks: int, lam: float = 0.3,
            learning_rate: Optional[float] = None, momentum: float = 0.5,
            max_iter: int = 20
            ) -> optax.GradientTransformationExtraArgs:
  """SDMGrad: stochastic direction-oriented multi-objective gradient.

  Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and
  Provable Stochastic Algorithms", NeurIPS 2023. The weights ``w`` minimise
  ``||g_w + lam g0||^2 / 2`` over the simplex by ``max_iter`` steps of
  projected heavy-ball SGD (fresh momentum each call, warm-started ``w``)
  with the stochastic gradient ``A_n (w + lam 1/K)``, where ``A`` is the
  cross-batch matrix ``J J'^T`` (see the module docstring for
  ``second_task_grads``) normalised as in LibMTL,
  ``A_n = A / mean_i(sqrt(max(A_ii, 0)))**2`` (the official code divides by
  ``mean_i(sqrt(A_ii + 1e-4))**2`` without a clamp, which is
  scale-dependent and NaN for a negative cross-batch diagonal). Then
  ``d = sum_i (w_i + lam / K) / (1 + lam) g_i`` over ``updates``: the scale
  of ``g0`` (weights sum to 1). ``lam = 0`` gives stochastic MGDA; large
  ``lam`` gives ``g0``.

  .. math::

     d &= \\sum_i \\frac{w_i + \\lambda / K}{1 + \\lambda}\\, g_i, \\\\
     w &\\approx \\arg\\min_{w \\in \\Delta} \\tfrac{1}{2} \\|g_w + \\lambda g_0\\|^2

  If every ``A_ii <= 0`` (possible for a cross-batch matrix) the official
  normaliser is 0 and its ``1e-8`` guard makes the step scale-dependent; here
  ``A`` is divided by ``max |A_ij|`` instead.

  Args:
    num_tasks: number of tasks K.
    lam: pull towards the mean gradient (paper's experiments, LibMTL and
      TorchJD: 0.3). Injectable.
    learning_rate: inner step size (formerly ``lr``, a deprecated alias).
      The default None takes ``1 / ||A_n||_F`` (at most
      ``1 / lambda_max``), a step with which the inner loop contracts, so
      the weights are a continuous function of the gradients. LibMTL's 5
      (TorchJD: 10) overshoots to simplex vertices and makes the loop
      chaotic: the vertex reached then depends on floating-point rounding,
      so ``jit``, eager execution and ``vmap`` disagree (by up to the whole
      update). Pass ``learning_rate=5.0`` to reproduce LibMTL eagerly.
      Injectable.
    momentum: inner heavy-ball momentum (0.5 in both). Injectable.
    max_iter: inner iterations (20; static int; formerly ``num_iters``, a
      deprecated alias).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`SDMGradState`.

  Example (single batch, the fallback ``A = J J^T``; LibMTL's inner step
  ``learning_rate = 5`` overshoots to a vertex, a smaller one converges, here
  to MGDA's weights [0.6, 0.4] since they are reachable as ``(w + lam/K) /
  (1 + lam)``):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> for lr in (5.0, None):
    ...   tx = mo.sdmgrad(2, learning_rate=lr)
    ...   update, state = tx.update(grads, tx.init(jnp.zeros(3)))
    ...   print(lr, np.asarray(state.weights, np.float64).round(4))
    5.0 [0.1154 0.8846]
    None [0.6 0.4]
  """
  method = "sdmgrad"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(lam, "lam", method)
  if learning_rate is not None:
    validation.check_positive(learning_rate, "learning_rate", method)
  validation.check_probability(momentum, "momentum", method, exclude_one=True)
  validation.check_positive_int(max_iter, "max_iter", method)

  def init_fn(params):
    uniform = base.uniform_weights(num_tasks, base.state_dtype(params))
    return SDMGradState(uniform, uniform)

  def step(updates, state, params, extra_args):
    del params
    matrix, _ = _weight_matrix(method, updates, extra_args, num_tasks)
    dtype = matrix.dtype
    diag_scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(matrix), 0.0)))
    peak = jnp.max(jnp.abs(matrix))
    divisor = jnp.where(diag_scale > 0, diag_scale**2,
                        jnp.where(peak > 0, peak, 1.0))
    matrix = matrix / divisor
    lam_ = jnp.asarray(lam, dtype)
    if learning_rate is None:
      frobenius = jnp.sqrt(jnp.sum(jnp.square(matrix)))
      lr_ = 1.0 / jnp.where(frobenius > 0, frobenius, 1.0)
    else:
      lr_ = jnp.asarray(learning_rate, dtype)
    mu = jnp.asarray(momentum, dtype)
    uniform = base.uniform_weights(num_tasks, dtype)
    pull = lam_ * (matrix @ uniform)

    def inner(_, carry):
      w, velocity = carry
      velocity = mu * velocity + matrix @ w + pull
      return solvers.project_to_simplex(w - lr_ * velocity), velocity

    start = base.finite_or(state.simplex_weights.astype(dtype), uniform)
    w, _ = jax.lax.fori_loop(0, max_iter, inner,
                             (start, jnp.zeros_like(start)))
    weights = (w + lam_ * uniform) / (1 + lam_)
    sdtype = state.weights.dtype
    return (tree_math.weighted_task_sum(weights, updates),
            SDMGradState(weights.astype(sdtype), w.astype(sdtype)))

  return base.guarded_transformation(
      num_tasks, method, init_fn, step)


# ---------------------------------------------------------------------- MoDo


class MoDoState(NamedTuple):
  """State of :func:`modo`.

  Attributes:
    weights: ``(K,)`` the task weights ``lambda`` of the last update (on the
      simplex).
  """
  weights: jax.Array


@deprecation.renamed_arguments(gamma="learning_rate")
def modo(num_tasks: int, learning_rate: float = 1e-3, rho: float = 0.1
         ) -> optax.GradientTransformationExtraArgs:
  """MoDo: multi-objective gradient with double sampling.

  Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective
  Learning: Optimization, Generalization and Conflict-Avoidance", NeurIPS
  2023 / JMLR 2024. One projected step on the weights per update,
  ``lambda <- Proj_simplex(lambda - lr (J J'^T lambda + rho lambda))``
  (``lr = learning_rate``)
  with the cross-batch matrix of two independent mini-batches (see the
  module docstring for ``second_task_grads``), then ``d = sum_i lambda_i g_i``
  over ``updates``: the scale of ``g0``. As in the paper and LibMTL the step
  acts on the unnormalised matrix, so ``learning_rate`` must suit the squared
  gradient scale (LibMTL's defaults below; TorchJD 0.18's ``MoDoWeighting``
  takes the same simplex projection with ``rho = 0.1`` and agrees with this
  one). For gradients so large that ``lr ||g||^2`` overflows the
  step is capped, which gives its limit.

  .. math::

     \\lambda &\\leftarrow \\Pi_\\Delta\\big(\\lambda - \\gamma (J J'^\\top \\lambda
     + \\rho \\lambda)\\big), \\\\
     d &= \\sum_i \\lambda_i g_i

  Args:
    num_tasks: number of tasks K.
    learning_rate: step size of the weights (LibMTL: 1e-3; formerly
      ``gamma``, a deprecated alias). Injectable.
    rho: l2 regularisation of the weights (LibMTL: 0.1). Injectable.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`MoDoState`.

  Example (two mini-batches; a large step size to make the step visible; the
  weights stay on the simplex):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> grads_2 = jnp.array([[-3., 1., 2.], [5., 0., 1.]])
    >>> tx = mo.modo(2, learning_rate=0.01)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)),
    ...                           second_task_grads=grads_2)
    >>> print(np.asarray(state.weights, np.float64).round(4),
    ...       round(float(state.weights.sum()), 4))
    [0.55 0.45] 1.0
  """
  method = "modo"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_positive(learning_rate, "learning_rate", method)
  validation.check_nonnegative(rho, "rho", method)

  def init_fn(params):
    return MoDoState(base.uniform_weights(num_tasks, base.state_dtype(params)))

  def step(updates, state, params, extra_args):
    del params
    matrix, scale = _weight_matrix(method, updates, extra_args, num_tasks)
    dtype = matrix.dtype
    gamma_ = jnp.asarray(learning_rate, dtype)
    lam = state.weights.astype(dtype)
    moved = lam - _capped_step(gamma_, scale) * (matrix @ lam) - (
        gamma_ * jnp.asarray(rho, dtype) * lam)
    weights = solvers.project_to_simplex(moved)
    return (tree_math.weighted_task_sum(weights, updates),
            MoDoState(weights.astype(state.weights.dtype)))

  return base.guarded_transformation(
      num_tasks, method, init_fn, step)


# ---------------------------------------------------------------------- MoCo


class MoCoState(NamedTuple):
  """State of :func:`moco`.

  Attributes:
    weights: ``(K,)`` the weights ``lambda`` of the last update, on the
      simplex. They weight the *tracked* gradients ``y_i``, not the current
      ``g_i``: ``d = sum_i weights[i] y_i``.
    count: number of finite steps taken.
    tracked: per leaf ``(K, *shape)``: the tracked gradients ``y``.
  """
  weights: jax.Array
  count: jax.Array
  tracked: Any
  weights_are_coefficients = False


@deprecation.renamed_arguments(
    beta=("decay", lambda beta: 1 - beta), beta_sigma="decay_sigma",
    gamma="learning_rate", gamma_sigma="learning_rate_sigma")
def moco(num_tasks: int, decay: float = 0.5, decay_sigma: float = 0.5,
         learning_rate: float = 0.1, learning_rate_sigma: float = 0.5,
         rho: float = 0.0
         ) -> optax.GradientTransformationExtraArgs:
  """MoCo: stochastic multi-objective gradient correction by tracking.

  Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient
  Bias in Multi-objective Learning: A Provably Convergent Stochastic
  Approach", ICLR 2023, in LibMTL's version (with LibMTL's defaults). At step ``k = 1, 2, ...``, with
  ``h_i = L_i g_i / ||g_i||`` (each gradient rescaled to its task loss),
  the tracking rate ``beta_k = (1 - decay) / k**decay_sigma`` and the step
  ``gamma_k = learning_rate / k**learning_rate_sigma``::

      y      <- y - beta_k (y - h)                    (tracked, in the state)
      lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda)
      d      =  sum_i lambda_i y_i

  .. math::

     y_i &\\leftarrow y_i - \\beta_k (y_i - h_i), \\qquad
     h_i = L_i \\frac{g_i}{\\|g_i\\|}, \\\\
     \\lambda &\\leftarrow \\operatorname{softmax}\\big(\\lambda - \\gamma_k
     (Y Y^\\top + \\rho I) \\lambda\\big), \\qquad d = \\sum_i \\lambda_i y_i

  Output scale: a convex combination of the tracked ``y_i``, whose norms
  approach the task losses ``L_i`` (not ``g0``'s scale). The paper's
  Algorithm 1 and the authors' public code track raw gradients and project
  ``lambda`` onto the simplex; the loss normalisation and the softmax used
  here are LibMTL's version.
  ``||g_i||`` has no ``1e-8`` guard here: a zero gradient gives ``h_i = 0``.
  Requires ``task_losses``. The state holds ``y``: one ``(K, *shape)`` array
  per parameter (float32 or wider).

  Args:
    num_tasks: number of tasks K.
    decay: EMA decay of the tracked gradients at step 1, in [0, 1) (0.5;
      optax's meaning, the weight of the old value; formerly ``beta`` =
      ``1 - decay``, the weight of the new one, a deprecated alias that
      converts).
    decay_sigma: exponent of the tracking rate's schedule (0.5; formerly
      ``beta_sigma``). Injectable.
    learning_rate: step size of the weights (0.1; formerly ``gamma``).
      Injectable.
    learning_rate_sigma: exponent of the step's schedule (0.5; formerly
      ``gamma_sigma``). Injectable.
    rho: l2 regularisation of the weights (0). Injectable.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`MoCoState`.

  Example:
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> grads = jnp.array([[3., 4., 0.], [0., 0., 2.]])
    >>> tx = mo.moco(2)
    >>> update, state = tx.update(grads, tx.init(jnp.zeros(3)),
    ...                           task_losses=jnp.array([1., 2.]))
    >>> print(np.asarray(state.tracked, np.float64).round(4))
    [[0.3 0.4 0. ]
     [0.  0.  1. ]]
    >>> print(np.asarray(state.weights, np.float64).round(4))
    [0.5094 0.4906]
  """
  method = "moco"
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_probability(decay, "decay", method, exclude_one=True)
  validation.check_positive(learning_rate, "learning_rate", method)
  for name, value in (("decay_sigma", decay_sigma),
                      ("learning_rate_sigma", learning_rate_sigma),
                      ("rho", rho)):
    validation.check_nonnegative(value, name, method)

  def init_fn(params):
    return MoCoState(base.uniform_weights(num_tasks, base.state_dtype(params)),
                     jnp.zeros((), jnp.int32), _state_tree(params, num_tasks))

  def step(updates, state, params, extra_args):
    del params
    dtype = state.weights.dtype
    losses = jnp.asarray(extra_args["task_losses"])
    norms = tree_math.task_norms(updates)
    # h_i = L_i * (g_i / ||g_i||): the unit vector first, since L / ||g||
    # alone can overflow (a tiny gradient with a large loss).
    # A subnormal norm counts as zero (its reciprocal overflows).
    active = norms >= jnp.finfo(norms.dtype).tiny
    inv_norm = 1.0 / jnp.where(active, norms, 1.0)
    loss_or_zero = jnp.where(active, losses.astype(norms.dtype), 0.0)
    k = (state.count + 1).astype(dtype)
    beta_k = (1 - jnp.asarray(decay, dtype)) / k ** jnp.asarray(decay_sigma,
                                                                 dtype)
    gamma_k = jnp.asarray(learning_rate, dtype) / k ** jnp.asarray(
        learning_rate_sigma, dtype)

    def track(y, g):
      per_task = lambda v: v.astype(y.dtype).reshape(
          (num_tasks,) + (1,) * (g.ndim - 1))
      target = per_task(loss_or_zero) * (g.astype(y.dtype) * per_task(inv_norm))
      return y - beta_k.astype(y.dtype) * (y - target)

    tracked = jax.tree.map(track, state.tracked, updates)
    normalized = tree_math.normalized_gram(tracked)
    gram = normalized.gram.astype(dtype)
    lam = state.weights
    logits = lam - _capped_step(gamma_k, normalized.rms_norm.astype(dtype)) * (
        gram @ lam) - gamma_k * jnp.asarray(rho, dtype) * lam
    weights = jax.nn.softmax(logits)
    update = jax.tree.map(lambda d, g: d.astype(g.dtype),
                          tree_math.weighted_task_sum(weights, tracked),
                          updates)
    return update, MoCoState(weights, state.count + 1, tracked)

  return base.guarded_transformation(
      num_tasks, method, init_fn, step,
                                 requires_task_losses=True)
