"""Evaluation metrics: the two published conventions of Delta-m.

Delta-m compares a multi-task model's metrics with single-task baselines.
The literature uses two incompatible definitions; both are offered, under
explicit names, and never mixed:

* :func:`delta_m_flat` — CAGrad / Nash-MTL / FAMO: a flat average over all M
  metrics, **positive = worse**.
* :func:`delta_m_per_task` — LibMTL: average within each task, then over
  tasks, **positive = better**.

These are host-side evaluation utilities (NumPy), not per-step code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ("delta_m_flat", "delta_m_per_task")


def _relative_changes(metrics, baseline, higher_is_better):
  metrics = np.asarray(metrics, np.float64)
  baseline = np.asarray(baseline, np.float64)
  higher = np.asarray(higher_is_better, bool)
  if not metrics.shape == baseline.shape == higher.shape or metrics.ndim != 1:
    raise ValueError(
        "metrics, baseline and higher_is_better must be 1-D and of the same "
        f"length, got shapes {metrics.shape}, {baseline.shape}, {higher.shape}.")
  if np.any(baseline == 0):
    raise ValueError("a baseline metric is 0: relative change is undefined.")
  return (metrics - baseline) / baseline, higher


def delta_m_flat(metrics: Sequence[float], baseline: Sequence[float],
                 higher_is_better: Sequence[bool]) -> float:
  """Delta-m % as in CAGrad (Liu et al., 2021, §5.2) and Nash-MTL.

  ``Delta_m = (100 / M) sum_k (-1)^{l_k} (M_m,k - M_b,k) / M_b,k`` over all M
  metrics, ``l_k = 1`` when higher is better. Positive means worse than the
  baseline.

  Example (CAGrad's NYUv2 row against the single-task baseline):
    >>> from mtl_optax._src.metrics import delta_m_flat
    >>> stl = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
    >>> cagrad = [39.79, 65.49, 0.5486, 0.2250, 26.31, 21.58, 25.61, 52.36,
    ...           65.58]
    >>> higher = [True, True, False, False, False, False, True, True, True]
    >>> print(round(delta_m_flat(cagrad, stl, higher), 2))
    0.19
  """
  change, higher = _relative_changes(metrics, baseline, higher_is_better)
  return float(100.0 * np.mean(np.where(higher, -change, change)))


def delta_m_per_task(metrics: Sequence[float], baseline: Sequence[float],
                     higher_is_better: Sequence[bool],
                     task_of_metric: Sequence[int]) -> float:
  """Delta-p % as in LibMTL (Lin & Zhang, JMLR 2023).

  ``Delta_p = (100 / T) sum_t (1 / N_t) sum_i (-1)^{s_t,i}
  (M_m,t,i - M_b,t,i) / M_b,t,i``, ``s_t,i = 1`` when lower is better: the
  average over each task's metrics, then over tasks. Positive means better.

  Args:
    metrics, baseline, higher_is_better: one entry per metric.
    task_of_metric: the task index of each metric.

  Example (the same NYUv2 row, tasks: segmentation, depth, normals):
    >>> from mtl_optax._src.metrics import delta_m_per_task
    >>> stl = [38.30, 63.76, 0.6754, 0.2780, 25.01, 19.21, 30.14, 57.20, 69.15]
    >>> cagrad = [39.79, 65.49, 0.5486, 0.2250, 26.31, 21.58, 25.61, 52.36,
    ...           65.58]
    >>> higher = [True, True, False, False, False, False, True, True, True]
    >>> print(round(delta_m_per_task(cagrad, stl, higher,
    ...                              [0, 0, 1, 1, 2, 2, 2, 2, 2]), 2))
    4.33
  """
  change, higher = _relative_changes(metrics, baseline, higher_is_better)
  tasks = np.asarray(task_of_metric)
  if tasks.shape != change.shape:
    raise ValueError("task_of_metric must have one entry per metric.")
  signed = np.where(higher, change, -change)
  per_task = [np.mean(signed[tasks == t]) for t in np.unique(tasks)]
  return float(100.0 * np.mean(per_task))
