"""The Gram-weighting layer: task weights from a K x K Gram matrix.

Most methods of the library compute their update as ``d = sum_i c_i g_i``
with coefficients ``c`` that depend on the task gradients only through
their Gram matrix ``G[i, j] = <g_i, g_j>``. This module exposes that map
directly, one pure, jittable function per method, for users who have a Gram
matrix however they computed it (a Gram-first training step, a
representation's gradients, a sharded contraction). The stacked-gradient
factories (``mo.mgda``, ``mo.cagrad``, ...) are built on these functions.

One calling convention for every function::

    out = gram_weightings.METHOD(gram, state=None, *, hyper_parameters...)
    out.weights   # (K,) c, with update = sum_i c_i g_i
    out.state     # pass as `state=` to the next call

* ``gram``: the raw ``(K, K)`` Gram matrix ``J J^T`` of any magnitude (any
  finite entries, e.g. 1e-30 ... 1e30), or a
  :class:`~mtl_optax._src.tree_math.NormalizedGram` (unit-trace matrix and
  its RMS norm, as :func:`normalize_gram` returns). A raw matrix is
  normalised first by :func:`normalize_gram`; every method solves on the
  unit-trace matrix, so its tolerances are relative.
* ``state``: the method's state, the same NamedTuple as the state of its
  optax factory (``mo.MGDAState``, ``mo.CAGradState``, ...), which always has
  a ``weights`` field. ``None`` means the factory's initial state (uniform
  warm start, zero targets, an empty moving average, ``PRNGKey(seed)``).
  Memoryless methods accept it and ignore it. Warm starts, EMAs and PRNG
  keys advance exactly as in the factory, so a loop over these functions
  and the optax transformation give the same weights step by step.
* Hyper-parameters are keyword-only, with the factory's names and defaults.
* The result is a :class:`GramWeights` ``(weights, state)``, with
  ``state.weights == weights``. A non-finite Gram matrix gives NaN weights
  and returns the previous (or initial) state unchanged.

Scale: the weights of the scale-invariant methods (all but ``nash_mtl`` and
``fairgrad``; ``pcd`` up to its absolute ``eps``) are the same for ``G`` and
``s G``, for any ``s > 0``. ``nash_mtl`` and ``fairgrad`` solve on the raw
scale: their weights behave as ``s**(-alpha / (1 + alpha))`` (``alpha = 1``
for Nash-MTL, before its ``max_norm`` clipping). Randomised methods
(``pcgrad``, ``gradvac``, CAGrad-Fast) draw from the key in their state.

Example (MGDA on TorchJD's test matrix J = [[-4, 1, 1], [6, 1, 1]]):
  >>> import jax.numpy as jnp, numpy as np
  >>> from mtl_optax import gram_weightings as gw
  >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
  >>> out = gw.mgda(jac @ jac.T)
  >>> print(np.asarray(out.weights, np.float64).round(4),
  ...       np.asarray(out.weights @ jac, np.float64).round(4))
  [0.6 0.4] [0. 1. 1.]
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import aggregators
from mtl_optax._src import bargaining
from mtl_optax._src import base
from mtl_optax._src import cagrad as _cagrad
from mtl_optax._src import closed_form
from mtl_optax._src import deprecation
from mtl_optax._src import dual_cone
from mtl_optax._src import eager
from mtl_optax._src import priority
from mtl_optax._src import prng
from mtl_optax._src import robust
from mtl_optax._src import solvers
from mtl_optax._src import surgery
from mtl_optax._src import tree_math
from mtl_optax._src.tree_math import NormalizedGram

__all__ = (
    "GramWeights",
    "NormalizedGram",
    "aligned_mtl",
    "cagrad",
    "config",
    "dualproj",
    "fairgrad",
    "imtl_g",
    "krum",
    "mgda",
    "nash_mtl",
    "normalize_gram",
    "pcd",
    "pcgrad",
    "gradvac",
    "upgrad",
)

Gram = Any  # a (K, K) array or a NormalizedGram


class GramWeights(NamedTuple):
  """What every function of the Gram-weighting layer returns.

  Attributes:
    weights: ``(K,)`` task weights ``c``: the update is ``sum_i c_i g_i``.
    state: the method's new state (its ``weights`` field equals
      ``weights``); pass it as ``state=`` to the next call.
  """
  weights: jax.Array
  state: Any


@eager.compiled_when_eager
def normalize_gram(gram: jax.Array) -> NormalizedGram:
  """A raw ``(K, K)`` Gram matrix as a unit-trace matrix and its RMS norm.

  ``gram / rms_norm**2`` has trace K; safe for any finite magnitude (a
  second, rescaled pass when the trace overflows or underflows). The same
  normalisation as the stacked-gradient factories apply to their gradients.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> out = gw.normalize_gram(jnp.array([[2e30, 1e30], [1e30, 4e30]]))
    >>> print(np.asarray(out.gram, np.float64).round(4), f"{out.rms_norm:.4e}")
    [[0.6667 0.3333]
     [0.3333 1.3333]] 1.7321e+15
  """
  return tree_math.normalize_gram_matrix(gram)


def _normalized(gram: Gram, method: str) -> NormalizedGram:
  if isinstance(gram, NormalizedGram):
    matrix = jnp.asarray(gram.gram)
    out = NormalizedGram(matrix, jnp.asarray(gram.rms_norm, matrix.dtype))
  else:
    out = None
    matrix = jnp.asarray(gram)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or (
      matrix.shape[0] < 1):
    raise ValueError(f"gram_weightings.{method}: gram must be a square "
                     f"(K, K) matrix with K >= 1, got shape {matrix.shape}.")
  return out if out is not None else normalize_gram(matrix)


def _run(method: str, gram: Gram, state, initial: Callable, rule: Callable
         ) -> GramWeights:
  """Normalises ``gram``, fills a missing state, applies
  ``rule(normalized, state) -> (weights, new_state)``, and keeps the old
  state (with NaN weights) when the Gram matrix or the weights are not
  finite."""
  normalized = _normalized(gram, method)
  matrix = normalized.gram
  num_tasks = matrix.shape[0]
  if state is None:
    state = initial(num_tasks, matrix.dtype)
  weights, new_state = rule(normalized, state)
  finite = base.all_finite(matrix) & base.all_finite(weights)
  weights = jnp.where(finite, weights, jnp.nan)
  new_state = base.keep_if_finite(finite, new_state, state)
  return GramWeights(weights, new_state._replace(weights=weights))


def _uniform(num_tasks, dtype):
  return base.uniform_weights(num_tasks, dtype)


def _weights_state(state_type):
  return lambda num_tasks, dtype: state_type(_uniform(num_tasks, dtype))


def _preference(pref_vector, num_tasks, dtype, default):
  if pref_vector is None:
    return jnp.full((num_tasks,), default, dtype)
  return jnp.asarray(pref_vector, dtype)


def _static_one_to_none(every: Any) -> Any:
  """None for a concrete ``update_every`` of 1 (every step solves), so that
  the compiled step has no solve-or-reuse branch; otherwise ``every``."""
  if isinstance(every, (int, np.integer)) and every == 1:
    return None
  return every


def _warm_start(previous: jax.Array, warm_start: bool, dtype) -> jax.Array:
  uniform = _uniform(previous.shape[0], dtype)
  if not warm_start:
    return uniform
  return base.finite_or(previous.astype(dtype), uniform)


# --- MGDA-type solvers on the simplex ---


@eager.compiled_when_eager
def mgda(gram: Gram, state: Optional[aggregators.MGDAState] = None, *,
         max_iter: int = 500, tol: Optional[float] = None,
         warm_start: bool = True) -> GramWeights:
  """MGDA's min-norm weights ``argmin_{w in simplex} w^T G w``.

  As :func:`mtl_optax.mgda` (Sener & Koltun, NeurIPS 2018); scale-invariant.
  State: :class:`mtl_optax.MGDAState` (warm start, solver residual).

  .. math::

     w = \\arg\\min_{w \\in \\Delta} w^\\top G w

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> out = gw.mgda(jnp.array([[1., -1.], [-1., 4.]]))
    >>> print(np.asarray(out.weights, np.float64).round(4))
    [0.7143 0.2857]
  """
  def rule(normalized, state):
    g = normalized.gram
    sol = solvers.min_norm_weights(
        g, _warm_start(state.weights, warm_start, g.dtype), max_iter, tol)
    return sol.weights, aggregators.MGDAState(sol.weights, sol.residual)

  return _run("mgda", gram, state, lambda k, dtype: aggregators.MGDAState(
      _uniform(k, dtype), jnp.zeros((), dtype)), rule)


@eager.compiled_when_eager
def cagrad(gram: Gram, state: Optional[_cagrad.CAGradState] = None, *,
           c: float | jax.Array = 0.4, rescale: int = 1,
           max_iter: int = 500, tol: Optional[float] = None,
           warm_start: bool = True, num_sampled_tasks: Optional[int] = None,
           seed: int = 0) -> GramWeights:
  """CAGrad's coefficients ``(g0 + lambda g_w*) / rescale`` on the tasks.

  As :func:`mtl_optax.cagrad` (Liu et al., NeurIPS 2021), including
  CAGrad-Fast (``num_sampled_tasks``, which draws from the state's key);
  scale-invariant. State: :class:`mtl_optax.CAGradState` (dual warm start,
  residual, key).

  .. math::

     w_i &= \\frac{1 / K + \\lambda w^\\star_i}{s}, \\qquad
     \\lambda = \\frac{c \\|g_0\\|}{\\|g_{w^\\star}\\|}, \\\\
     \\|g_v\\|^2 &= v^\\top G v, \\qquad g_0 = g_{\\mathbf{1}/K}

  Example (the CAGrad reference's test vector, c = 0.4):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> jac = jnp.array([[1., 0., 0.], [0., 1., 0.], [-0.5, -0.2, 0.3]])
    >>> out = gw.cagrad(jac @ jac.T, c=0.4)
    >>> print(np.asarray(out.weights @ jac, np.float64).round(5))
    [0.05138 0.19297 0.14158]
  """
  def initial(num_tasks, dtype):
    uniform = _uniform(num_tasks, dtype)
    return _cagrad.CAGradState(uniform, uniform, jnp.zeros((), dtype),
                               jax.random.PRNGKey(seed))

  def rule(normalized, state):
    g = normalized.gram
    num_tasks = g.shape[0]
    if num_sampled_tasks is None:
      coefficients, sol = _cagrad.cagrad_coefficients(
          g, c, rescale, _warm_start(state.dual_weights, warm_start, g.dtype),
          max_iter, tol)
      return coefficients, _cagrad.CAGradState(
          coefficients, sol.weights, sol.residual, state.key)
    key, subkey = prng.split(state.key)
    mixing = _cagrad.sampled_task_matrix(subkey, num_tasks,
                                         num_sampled_tasks).astype(g.dtype)
    anchor = jnp.concatenate([
        jnp.full((num_sampled_tasks,), 1.0 / num_tasks, g.dtype),
        jnp.full((1,), (num_tasks - num_sampled_tasks) / num_tasks,
                 g.dtype)])
    surrogate, sol = _cagrad.cagrad_coefficients(
        mixing @ g @ mixing.T, c, rescale, None, max_iter, tol, anchor)
    coefficients = mixing.T @ surrogate
    return coefficients, _cagrad.CAGradState(
        coefficients, mixing.T @ sol.weights, sol.residual, key)

  return _run("cagrad", gram, state, initial, rule)


# --- projections onto the dual cone ---


def _dual_cone(method, weights_fn, gram, state, pref_vector, reg_eps,
               max_iter, tol):
  def initial(num_tasks, dtype):
    return dual_cone.DualConeState(
        _preference(pref_vector, num_tasks, dtype, 1.0 / num_tasks),
        jnp.zeros((), dtype))

  def rule(normalized, state):
    g = normalized.gram
    pref = _preference(pref_vector, g.shape[0], g.dtype, 1.0 / g.shape[0])
    weights, sol = weights_fn(g, pref, reg_eps, max_iter, tol)
    return weights, dual_cone.DualConeState(weights, sol.residual)

  return _run(method, gram, state, initial, rule)


@eager.compiled_when_eager
def upgrad(gram: Gram, state: Optional[dual_cone.DualConeState] = None, *,
           pref_vector: Optional[Sequence[float] | jax.Array] = None,
           reg_eps: float | jax.Array = 1e-4, max_iter: int = 100,
           tol: Optional[float] = None) -> GramWeights:
  """UPGrad's coefficients ``sum_i v^(i)``, ``v^(i) = argmin_{v >= p_i e_i}
  v^T (G / tr G + reg_eps I) v``.

  As :func:`mtl_optax.upgrad` (Quinton & Rey, 2024); scale-invariant,
  memoryless. State: :class:`mtl_optax.DualConeState` (the QP residual).

  .. math::

     w = \\sum_i v^{(i)}, \\qquad v^{(i)} = \\arg\\min_{v \\ge p_i e_i}
     v^\\top \\Big( \\frac{G}{\\operatorname{tr} G} + \\epsilon I \\Big) v

  Example (TorchJD's test matrix, ``G = J J^T``: the update conflicts with
  no task, ``J d = G w >= 0``):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])
    >>> w = gw.upgrad(gram).weights
    >>> print(np.asarray(w, np.float64).round(4),
    ...       np.asarray(gram @ w, np.float64).round(4))
    [1.1109 0.7894] [2.6291 5.5581]
  """
  return _dual_cone("upgrad", dual_cone.upgrad_weights, gram, state,
                    pref_vector, reg_eps, max_iter, tol)


@eager.compiled_when_eager
def dualproj(gram: Gram, state: Optional[dual_cone.DualConeState] = None, *,
             pref_vector: Optional[Sequence[float] | jax.Array] = None,
             reg_eps: float | jax.Array = 1e-4, max_iter: int = 100,
             tol: Optional[float] = None) -> GramWeights:
  """DualProj's coefficients ``argmin_{v >= p} v^T (G / tr G + reg_eps I) v``.

  As :func:`mtl_optax.dualproj` (Lopez-Paz & Ranzato, NeurIPS 2017);
  scale-invariant, memoryless. State: :class:`mtl_optax.DualConeState`.

  .. math::

     w = \\arg\\min_{v \\ge p} v^\\top \\Big( \\frac{G}{\\operatorname{tr} G}
     + \\epsilon I \\Big) v

  Example (TorchJD's test matrix; the weights do not change when the Gram
  matrix is scaled by 1e20):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> for scale in (1.0, 1e20):
    ...   gram = scale * jnp.array([[18., -22.], [-22., 38.]])
    ...   print(np.asarray(gw.dualproj(gram).weights, np.float64).round(4))
    [0.6109 0.5   ]
    [0.6109 0.5   ]
  """
  return _dual_cone("dualproj", dual_cone.dualproj_weights, gram, state,
                    pref_vector, reg_eps, max_iter, tol)


# --- closed forms and selections (memoryless; state: the last weights) ---


def _memoryless(method, gram, state, state_type, weights_fn, initial=None):
  def rule(normalized, state):
    del state
    weights = weights_fn(normalized.gram)
    return weights, state_type(weights)
  return _run(method, gram, state, initial or _weights_state(state_type),
              rule)


@eager.compiled_when_eager
def imtl_g(gram: Gram, state: Optional[aggregators.WeightsState] = None
           ) -> GramWeights:
  """IMTL-G's weights ``G^+ n / (1^T G^+ n)``, ``n_i = ||g_i||``.

  As :func:`mtl_optax.imtl_g` (Liu et al., ICLR 2021); scale-invariant.
  State: :class:`mtl_optax.WeightsState`.

  .. math::

     w = \\frac{G^+ n}{\\mathbf{1}^\\top G^+ n}, \\qquad n_i = \\sqrt{G_{ii}}

  Example (a :class:`NormalizedGram` input; the update's projections onto
  the unit gradients, ``(G w)_i / sqrt(G_ii)``, are equal):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])
    >>> w = gw.imtl_g(gw.normalize_gram(gram)).weights
    >>> print(np.asarray(w, np.float64).round(4), np.asarray(
    ...     gram @ w / jnp.sqrt(jnp.diag(gram)), np.float64).round(4))
    [0.5923 0.4077] [0.3991 0.3991]
  """
  return _memoryless("imtl_g", gram, state, aggregators.WeightsState,
                     closed_form.imtl_g_weights)


@eager.compiled_when_eager
def aligned_mtl(gram: Gram, state: Optional[aggregators.WeightsState] = None,
                *, scale_mode: str = "min",
                pref_vector: Optional[Sequence[float] | jax.Array] = None
                ) -> GramWeights:
  """Aligned-MTL's weights ``B p``, ``B = sqrt(s) V L^(-1/2) V^T``.

  As :func:`mtl_optax.aligned_mtl` (Senushkin et al., CVPR 2023);
  scale-invariant. State: :class:`mtl_optax.WeightsState`.

  .. math::

     w = B p, \\qquad B = \\sqrt{s}\\, V \\Lambda^{-1/2} V^\\top, \\qquad
     G = V \\Lambda V^\\top

  Example (orthogonal gradients of norms 3 and 1: ``d = w @ J = (1/2,
  1/2)``, both aligned to the smallest norm):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> out = gw.aligned_mtl(jnp.diag(jnp.array([9., 1.])), scale_mode="min")
    >>> print(np.asarray(out.weights, np.float64).round(4))
    [0.1667 0.5   ]
  """
  if scale_mode not in closed_form.SCALE_MODES:
    raise ValueError(f"gram_weightings.aligned_mtl: scale_mode must be one "
                     f"of {closed_form.SCALE_MODES}, got {scale_mode!r}.")

  def pref(num_tasks, dtype):
    return _preference(pref_vector, num_tasks, dtype, 1.0 / num_tasks)

  return _memoryless(
      "aligned_mtl", gram, state, aggregators.WeightsState,
      lambda g: closed_form.aligned_mtl_weights(
          g, pref(g.shape[0], g.dtype), scale_mode),
      lambda k, dtype: aggregators.WeightsState(pref(k, dtype)))


@eager.compiled_when_eager
def config(gram: Gram, state: Optional[aggregators.WeightsState] = None, *,
           pref_vector: Optional[Sequence[float] | jax.Array] = None
           ) -> GramWeights:
  """ConFIG's mean-scale coefficients ``D^-1 C^+ p`` (rescaled).

  As :func:`mtl_optax.config` (Liu, Chu & Thuerey, ICLR 2025): the update
  is the mean projection, ``1/K`` of the paper's and TorchJD's;
  scale-invariant. State: :class:`mtl_optax.WeightsState`.

  Example (TorchJD's test matrix; TorchJD's update is twice this):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> d = gw.config(jac @ jac.T).weights @ jac
    >>> print(np.asarray(d, np.float64).round(4))
    [0.0794 1.0353 1.0353]
  """
  return _memoryless(
      "config", gram, state, aggregators.WeightsState,
      lambda g: closed_form.config_weights(
          g, _preference(pref_vector, g.shape[0], g.dtype, 1.0)))


@eager.compiled_when_eager
def krum(gram: Gram, state: Optional[robust.KrumState] = None, *,
         n_byzantine: int = 0, n_selected: int = 1) -> GramWeights:
  """(Multi-)Krum's weights: ``1 / n_selected`` on the most central tasks.

  As :func:`mtl_optax.krum` (Blanchard et al., NeurIPS 2017); needs
  ``K >= n_byzantine + 3``; scale-invariant. State:
  :class:`mtl_optax.KrumState`.

  .. math::

     w_i &= \\frac{1}{m} [i \\in S], \\qquad
     S = \\text{the } m \\text{ tasks of lowest } s(i), \\\\
     s(i) &= \\sum_{j \\in N_i} (G_{ii} - 2 G_{ij} + G_{jj}), \\qquad
     |N_i| = K - f - 2

  Example (TorchJD's Krum test matrix: row 2 is the outlier):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> jac = jnp.array([[1., 1., 1.], [1., 0., 1.], [75., -666., 23.],
    ...                  [1., 2., 3.], [2., 0., 1.]])
    >>> out = gw.krum(jac @ jac.T, n_byzantine=1, n_selected=4)
    >>> print(np.asarray(out.weights))
    [0.25 0.25 0.   0.25 0.25]
  """
  def weights_fn(g):
    num_tasks = g.shape[0]
    if num_tasks < n_byzantine + 3 or not 1 <= n_selected <= num_tasks:
      raise ValueError(
          f"gram_weightings.krum: needs n_byzantine + 3 <= K and 1 <= "
          f"n_selected <= K, got K={num_tasks}, n_byzantine={n_byzantine}, "
          f"n_selected={n_selected}.")
    return robust.krum_weights(g, n_byzantine, n_selected)

  return _memoryless("krum", gram, state, robust.KrumState, weights_fn)


# --- scale-dependent solvers (raw Gram scale) ---


@deprecation.renamed_arguments(update_weights_every="update_every")
@eager.compiled_when_eager
def nash_mtl(gram: Gram, state: Optional[bargaining.NashMTLState] = None, *,
             update_every: int = 1, max_iter: int = 20,
             max_norm: float | jax.Array = 1.0, tol: Optional[float] = None
             ) -> GramWeights:
  """Nash-MTL's weights: ``alpha_i (G alpha)_i = 1``, then ``||d|| <= max_norm``.

  As :func:`mtl_optax.nash_mtl` (Navon et al., ICML 2022): solved on the raw
  scale (``alpha`` scales as ``s**-1/2`` for ``s G``), every ``update_every``
  calls (counted in
  the state), warm-started from the state's ``alpha``. State:
  :class:`mtl_optax.NashMTLState`.

  .. math::

     \\alpha_i (G \\alpha)_i &= 1 \\;\\; \\forall i, \\\\
     w &= \\alpha \\text{ scaled down so that } \\sqrt{w^\\top G w} \\le
     \\text{max_norm} \\;(\\text{if } \\text{max_norm} > 0)

  Example (TorchJD's test matrix; TorchJD's update is [0.0542, 0.7061,
  0.7061]; the state's ``alpha`` solves ``alpha_i (G alpha)_i = 1``):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> out = gw.nash_mtl(jac @ jac.T)
    >>> alpha = out.state.alpha
    >>> print(np.asarray(out.weights @ jac, np.float64).round(4),
    ...       np.asarray(alpha * (jac @ jac.T @ alpha), np.float64).round(4))
    [0.0542 0.7061 0.7061] [1. 1.]
  """
  def rule(normalized, state):
    g = normalized.gram
    rms = normalized.rms_norm.astype(g.dtype)
    alpha, residual = bargaining._nash_alpha(  # pylint: disable=protected-access
        g, rms, state.alpha.astype(g.dtype), state.residual.astype(g.dtype),
        state.count, _static_one_to_none(update_every), max_iter, tol)
    # ||d||**2 = alpha^T A alpha, computed on the O(1) vector rms * alpha.
    scaled = alpha * rms
    norm = jnp.sqrt(jnp.maximum(scaled @ g @ scaled, 0.0))
    limit = jnp.asarray(max_norm, g.dtype)
    clip = (limit > 0) & (norm > limit)
    weights = alpha * jnp.where(clip, limit / jnp.where(clip, norm, 1.0), 1.0)
    return weights, bargaining.NashMTLState(weights, alpha, state.count + 1,
                                            residual)

  return _run("nash_mtl", gram, state, bargaining.nash_mtl_initial_state,
              rule)


@eager.compiled_when_eager
def fairgrad(gram: Gram, state: Optional[bargaining.FairGradState] = None, *,
             alpha: float | jax.Array = 1.0, max_iter: int = 50,
             tol: Optional[float] = None) -> GramWeights:
  """FairGrad's weights: ``G w = w^(-1/alpha)`` on the raw Gram matrix.

  As :func:`mtl_optax.fairgrad` (Ban & Ji, ICML 2024): the weights scale as
  ``s**(-alpha / (1 + alpha))`` for ``s G``; ``alpha = 0`` gives ``1/K``.
  Memoryless. State: :class:`mtl_optax.FairGradState` (residual).

  .. math::

     G w = w^{-1/\\alpha} \\;\\text{(element-wise)}

  Example (TorchJD's test matrix, then 4 times it: the weights scale by
  ``4**(-1/2)``):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])
    >>> w1, w4 = gw.fairgrad(gram).weights, gw.fairgrad(4 * gram).weights
    >>> print(np.asarray(w1, np.float64).round(4),
    ...       np.asarray(w4 / w1, np.float64).round(4))
    [0.5915 0.4071] [0.5 0.5]
  """
  def initial(num_tasks, dtype):
    return bargaining.FairGradState(_uniform(num_tasks, dtype),
                                    jnp.zeros((), dtype))

  def rule(normalized, state):
    del state
    sol = bargaining.fairgrad_solution(normalized.gram, normalized.rms_norm,
                                       alpha, max_iter, tol)
    return sol.raw, bargaining.FairGradState(sol.raw, sol.residual)

  return _run("fairgrad", gram, state, initial, rule)


# --- gradient surgery (random visiting orders from the state's key) ---


@eager.compiled_when_eager
def pcgrad(gram: Gram, state: Optional[aggregators.PCGradState] = None, *,
           seed: int = 0) -> GramWeights:
  """PCGrad's coefficients ``mean_i g_i^PC`` for orders drawn from the key.

  As :func:`mtl_optax.pcgrad` (Yu et al., NeurIPS 2020): each call splits
  the state's key (``PRNGKey(seed)`` when ``state`` is None) and draws one
  order of the other tasks per task; scale-invariant. State:
  :class:`mtl_optax.PCGradState`.

  Example (two tasks: the order is deterministic):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> jac = jnp.array([[1., 0.], [-1., 1.]])
    >>> print(np.asarray(gw.pcgrad(jac @ jac.T).weights, np.float64).round(4))
    [1.   0.75]
  """
  def rule(normalized, state):
    key, subkey = prng.split(state.key)
    coeffs = aggregators.pcgrad_coefficients(normalized.gram, subkey)
    return coeffs, aggregators.PCGradState(coeffs, key)

  return _run("pcgrad", gram, state, lambda k, dtype: (
      aggregators.pcgrad_initial_state(k, dtype, seed)), rule)


@deprecation.renamed_arguments(beta=("decay", lambda beta: 1 - beta))
@eager.compiled_when_eager
def gradvac(gram: Gram, state: Optional[surgery.GradVacState] = None, *,
            decay: float | jax.Array = 0.5, seed: int = 0) -> GramWeights:
  """GradVac's coefficients towards the similarity targets of the state.

  As :func:`mtl_optax.gradvac` (Wang et al., ICLR 2021): the targets
  (``state.targets``, ``(K, K)``, zero when ``state`` is None: PCGrad's
  step) are EMAs of the observed cosines with ``decay`` (formerly ``beta =
  1 - decay``, a deprecated alias that converts); orders come from the
  state's key. Scale-invariant. State: :class:`mtl_optax.GradVacState`.

  Example (TorchJD's test matrix; TorchJD sums, giving twice the update; the
  new targets are the cosines' EMA):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> out = gw.gradvac(jac @ jac.T)
    >>> print(np.asarray(out.weights @ jac, np.float64).round(4),
    ...       np.asarray(out.state.targets[0, 1], np.float64).round(4))
    [0.2924 1.9006 1.9006] -0.4206
  """
  def rule(normalized, state):
    key, subkey = prng.split(state.key)
    coeffs, targets = surgery.gradvac_coefficients(
        normalized.gram, state.targets, decay, subkey)
    return coeffs, surgery.GradVacState(coeffs, targets, key)

  return _run("gradvac", gram, state, lambda k, dtype: (
      surgery.gradvac_initial_state(k, dtype, seed)), rule)


# --- priorities ---


@deprecation.renamed_arguments(beta="decay")
@eager.compiled_when_eager
def pcd(gram: Gram, state: Optional[priority.PCDState] = None, *,
        tau: float | Sequence[float] | jax.Array = 0.02,
        decay: float | jax.Array = 0.999, eps: float | jax.Array = 1e-8,
        max_iter: Optional[int] = None) -> GramWeights:
  """PCD's weights, the first task primary (Priority-Constrained Descent).

  As :func:`mtl_optax.pcd` (TMLR 2026; TorchJD's ``PCDWeighting``): the
  state carries the moving average of the squared gradient norms, updated
  on each call. The weights are scale-invariant up to the absolute ``eps``
  (exactly for ``eps = 0``), with ``||sum_i c_i g_i|| = ||g_1||``. State:
  :class:`mtl_optax.PCDState`.

  Example (TorchJD's test matrix, twice, the state passed on):
    >>> import jax.numpy as jnp, numpy as np
    >>> from mtl_optax import gram_weightings as gw
    >>> gram = jnp.array([[18., -22.], [-22., 38.]])
    >>> out = gw.pcd(gram, gw.pcd(gram).state)
    >>> print(int(out.state.count), np.asarray(out.weights, np.float64).round(4))
    2 [1.8481 1.0954]
  """
  def rule(normalized, state):
    return priority.pcd_weights(normalized, state, tau, decay, eps, max_iter)

  return _run("pcd", gram, state, priority.initial_state, rule)
