"""Projections onto the dual cone of the task gradients: UPGrad and DualProj.

The dual cone of the task gradients is the set of updates that conflict with
no task, ``{d : <g_i, d> >= 0 for every i}``. Projecting ``J^T u`` onto it is
the non-negative QP ``min_v v^T A v  s.t.  v >= u`` on the Gram matrix ``A``
(Quinton & Rey, 2024, Prop. 1), whose solution ``v`` gives the projection
``J^T v``. Here every such QP is solved on device
(:func:`mtl_optax._src.solvers.lower_bounded_qp`: every active set at once
for K <= 6, a batched interior-point loop beyond), all K rows of UPGrad at
once, instead of one host-side quadprog call per row.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from mtl_optax._src import base
from mtl_optax._src import solvers
from mtl_optax._src import tree_math
from mtl_optax._src import validation

__all__ = (
    "DualConeState",
    "dualproj",
    "dualproj_weights",
    "upgrad",
    "upgrad_weights",
)


class DualConeState(NamedTuple):
  """State of :func:`upgrad` and :func:`dualproj`.

  Attributes:
    weights: ``(K,)`` coefficients of the last update,
      ``d = sum_i weights[i] g_i``.
    residual: ``()`` largest relative residual of the last step's QPs (see
      ``solvers.BoxQPSolution``).
  """
  weights: jax.Array
  residual: jax.Array


def _regularised(gram: jax.Array, reg_eps) -> jax.Array:
  # TorchJD adds reg_eps to the diagonal of the Gram matrix divided by its
  # trace; ``gram`` has trace K, and the QP's solution is invariant to a
  # positive factor, so the same problem is ``gram + K reg_eps I``.
  num_tasks = gram.shape[0]
  ridge = num_tasks * jnp.asarray(reg_eps, gram.dtype)
  return gram + ridge * jnp.eye(num_tasks, dtype=gram.dtype)


def upgrad_weights(gram: jax.Array, pref: jax.Array, reg_eps=1e-4,
                   max_iter: int = 100, tol=None
                   ) -> tuple[jax.Array, solvers.BoxQPSolution]:
  """UPGrad's coefficients ``sum_i v^(i)``, ``v^(i) = argmin_{v >= p_i e_i}
  v^T (A / tr A + reg_eps I) v``, and the batched QP solution."""
  sol = solvers.lower_bounded_qp(_regularised(gram, reg_eps), jnp.diag(pref),
                                 max_iter, tol)
  return jnp.sum(sol.solution, axis=0), sol


def dualproj_weights(gram: jax.Array, pref: jax.Array, reg_eps=1e-4,
                     max_iter: int = 100, tol=None
                     ) -> tuple[jax.Array, solvers.BoxQPSolution]:
  """DualProj's coefficients ``argmin_{v >= p} v^T (A / tr A + reg_eps I) v``
  and the QP solution."""
  sol = solvers.lower_bounded_qp(_regularised(gram, reg_eps), pref, max_iter,
                                 tol)
  return sol.solution, sol


def _dual_cone_method(method, num_tasks, pref_vector, reg_eps, max_iter, tol,
                      weights_fn):
  num_tasks = validation.check_num_tasks(num_tasks, method)
  validation.check_nonnegative(reg_eps, "reg_eps", method)
  validation.check_positive_int(max_iter, "max_iter", method)
  pref = base.preference_vector(pref_vector, num_tasks, method,
                                1.0 / num_tasks)

  def init_state(dtype):
    return DualConeState(pref(dtype), jnp.zeros((), dtype))

  from mtl_optax import gram_weightings  # pylint: disable=g-import-not-at-top
  del weights_fn  # the layer's function of the same name wraps it
  layer = getattr(gram_weightings, method)

  def rule(context, state):
    return layer(tree_math.NormalizedGram(context.gram, context.rms_norm),
                 state, pref_vector=pref_vector, reg_eps=reg_eps,
                 max_iter=max_iter, tol=tol)

  return base.task_weighting_transformation(num_tasks, method, init_state, rule)


def upgrad(num_tasks: int, pref_vector: base.PrefVector = None,
           reg_eps: float = 1e-4, max_iter: int = 100,
           tol: Optional[float] = None
           ) -> optax.GradientTransformationExtraArgs:
  """UPGrad: project each task gradient onto the dual cone, then combine.

  Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
  (arXiv:2406.16232), TorchJD's recommended aggregator:
  ``d = sum_i p_i pi(g_i)`` where ``pi`` is the Euclidean projection onto the
  dual cone ``{x : <g_j, x> >= 0 for all j}``; ``pi(p_i g_i) = J^T v^(i)``
  with ``v^(i) = argmin_{v >= p_i e_i} v^T A v``. ``d`` conflicts with no
  task and equals ``sum_i p_i g_i`` when no two gradients conflict.

  .. math::

     d &= \\sum_i p_i\\, \\pi(g_i) = J^\\top \\sum_i v^{(i)}, \\qquad
     v^{(i)} = \\arg\\min_{v \\ge p_i e_i} v^\\top A v, \\\\
     \\pi(x) &= \\arg\\min_{y :\\, J y \\ge 0} \\|y - x\\|

  The K QPs are solved at once on device (exactly, over every active set,
  for K <= 6; beyond, an interior-point loop with an exact crossover; see
  ``solvers.lower_bounded_qp``);
  the largest residual is kept in the state. As in TorchJD, the Gram matrix
  is divided by its trace and ``reg_eps`` is added to its diagonal (the
  default 1e-4 reproduces TorchJD's values; it makes each QP strictly convex
  with a bounded solution, at the cost of conflicts up to
  ``reg_eps * ||J||_F^2 * v_i``). ``reg_eps=0`` gives the exact projection, up to
  the float resolution of the unit-trace Gram matrix: with task-gradient
  norms 1e-3 and 1e3 a small task's entries are 1e-12 of the large ones and
  a residual conflict of cosine ~1e-4 remains in float32 (the ``residual``
  in the state reports it; use float64 for such ratios). Unlike TorchJD there is no
  absolute ``norm_eps`` threshold: the method is scale-invariant down to
  gradients of 1e-30.

  Output scale: with the default ``p = 1/K`` (TorchJD's mean weighting),
  ``d`` is the mean of the projected gradients, on the scale of ``g0``.

  Args:
    num_tasks: number of tasks K.
    pref_vector: optional ``(K,)`` preference ``p``; default ``1/K``.
    reg_eps: ridge on the unit-trace Gram matrix (injectable).
    max_iter: cap on interior-point iterations per QP (K > 6).
    tol: QP tolerance on the relative residual (K > 6); default 1e-5 in
      float32, 1e-10 in float64.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DualConeState`.

  Example (TorchJD's test matrix J = [[-4, 1, 1], [6, 1, 1]]: the update
  conflicts with neither task, ``J d >= 0``):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> jac = jnp.array([[-4., 1., 1.], [6., 1., 1.]])
    >>> tx = mo.upgrad(2)
    >>> d, state = tx.update(jac, tx.init(jnp.zeros(3)))
    >>> print(np.asarray(jac @ d, np.float64).round(4),
    ...       np.asarray(state.weights, np.float64).round(4))
    [2.6291 5.5581] [1.1109 0.7894]
  """
  return _dual_cone_method("upgrad", num_tasks, pref_vector, reg_eps,
                           max_iter, tol, upgrad_weights)


def dualproj(num_tasks: int, pref_vector: base.PrefVector = None,
             reg_eps: float = 1e-4, max_iter: int = 100,
             tol: Optional[float] = None
             ) -> optax.GradientTransformationExtraArgs:
  """DualProj: project the preference-weighted gradient onto the dual cone.

  Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
  NeurIPS 2017, Eq. 11 (as TorchJD's DualProj): ``d = pi(sum_i p_i g_i)``,
  the Euclidean projection of ``J^T p`` onto ``{x : <g_j, x> >= 0 for all
  j}``, i.e. ``d = J^T v`` with ``v = argmin_{v >= p} v^T A v``. ``d``
  conflicts with no task and equals ``J^T p`` when ``J^T p`` conflicts with
  none.

  .. math::

     d &= \\pi\\Big( \\sum_i p_i g_i \\Big) = J^\\top v, \\qquad
     v = \\arg\\min_{v \\ge p} v^\\top A v, \\\\
     \\pi(x) &= \\arg\\min_{y :\\, J y \\ge 0} \\|y - x\\|

  One QP per step, solved on device (see :func:`upgrad` for the solver, the
  ``reg_eps`` regularisation shared with TorchJD and the residual in the
  state).

  Output scale: with the default ``p = 1/K``, the projected mean gradient
  (scale of ``g0``).

  Args:
    num_tasks: number of tasks K.
    pref_vector: optional ``(K,)`` preference ``p``; default ``1/K``.
    reg_eps: ridge on the unit-trace Gram matrix (injectable); 0 for the
      exact projection.
    max_iter: cap on interior-point iterations (K > 6).
    tol: QP tolerance (K > 6); default 1e-5 in float32, 1e-10 in float64.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with :class:`DualConeState`.

  Example (the mean gradient is kept when it conflicts with no task, and
  projected when it does):
    >>> import jax.numpy as jnp, numpy as np, mtl_optax as mo
    >>> tx = mo.dualproj(2, reg_eps=0.0)
    >>> for jac in ([[1., 0.], [0., 1.]], [[1., 0.], [-2., 1.]]):
    ...   d, _ = tx.update(jnp.array(jac), tx.init(jnp.zeros(2)))
    ...   print(np.asarray(d, np.float64).round(4))
    [0.5 0.5]
    [0.  0.5]
  """
  return _dual_cone_method("dualproj", num_tasks, pref_vector, reg_eps,
                           max_iter, tol, dualproj_weights)
