"""Records TorchJD 0.18's PCD weights as the oracle of ``mo.pcd``.

Runs TorchJD's ``PCDWeighting`` (stateful: the moving average of the squared
gradient norms carries over the steps of one case) in float64 on a few
sequences of Jacobians: TorchJD's test matrix, random ones with several K,
``tau``, ``beta`` and ``eps``, and the special cases of its docstring
(infeasible constraints, zero primary gradient, dependent rows, gradients
whose scale changes). Writes ``tests/data/pcd_reference.json``, which
``tests/test_priority.py`` reads; torch and torchjd are needed only here::

    pip install torch torchjd==0.18.0
    python benchmarks/record_pcd_reference.py
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torchjd
from torchjd.aggregation import PCDWeighting

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests/data/pcd_reference.json"


def _random_steps(rng, num_tasks, dim, num_steps, scales=None):
  steps = []
  for t in range(num_steps):
    jac = rng.normal(size=(num_tasks, dim))
    if scales is not None:
      jac = jac * np.asarray(scales[t])[:, None]
    steps.append(jac)
  return steps


def _cases():
  rng = np.random.default_rng(2026)
  torchjd_j = np.array([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])
  cases = [
      ("torchjd_matrix", [torchjd_j], 0.02, 0.999, 1e-8),
      ("torchjd_matrix_tau_half", [torchjd_j, 2 * torchjd_j], 0.5, 0.9, 1e-8),
      # Two opposite secondary gradients: no d meets both constraints.
      ("infeasible", [np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                                [0.0, -1.0, 0.0]])], 0.1, 0.999, 1e-8),
      ("zero_primary", [np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 0.0],
                                  [0.0, -1.0, 1.0]])], 0.02, 0.999, 1e-8),
      ("dependent_rows", [np.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0],
                                    [-2.0, 2.0, 0.0], [0.0, 0.0, 1.0]])],
       0.2, 0.999, 1e-8),
      ("opposite_k2", [np.array([[1.0, 2.0, -1.0], [-1.0, -2.0, 1.0]])],
       0.02, 0.999, 1e-8),
      ("k1", [np.array([[3.0, -1.0]])], 0.02, 0.999, 1e-8),
  ]
  for num_tasks in (2, 3, 4, 6):
    cases.append((f"random_k{num_tasks}",
                  _random_steps(rng, num_tasks, 7, 4), 0.02, 0.999, 1e-8))
    cases.append((f"random_k{num_tasks}_tau03_beta09",
                  _random_steps(rng, num_tasks, 5, 4), 0.3, 0.9, 1e-8))
  cases.append(("random_k4_tau_vector", _random_steps(rng, 4, 6, 3),
                [0.1, 0.5, 0.9], 0.99, 1e-8))
  cases.append(("random_k5_eps0", _random_steps(rng, 5, 8, 3), 0.25, 0.5,
                0.0))
  # Per-task scales that differ by orders of magnitude and drift over steps:
  # the normalisation by the moving average is what PCD is about.
  scales = [[1.0, 100.0, 0.01, 5.0], [2.0, 50.0, 0.02, 1.0],
            [0.5, 300.0, 0.005, 20.0], [1.0, 100.0, 0.01, 5.0],
            [4.0, 10.0, 0.1, 0.5]]
  cases.append(("random_k4_scales", _random_steps(rng, 4, 6, 5, scales),
                0.4, 0.8, 1e-8))
  # Many tasks, strongly conflicting, high tau: several constraints bind
  # and some are dropped along the way.
  cases.append(("random_k8_tau06", _random_steps(rng, 8, 10, 3), 0.6, 0.9,
                1e-8))
  return cases


def main():
  records = []
  for name, steps, tau, beta, eps in _cases():
    tau_arg = torch.tensor(tau, dtype=torch.float64) if isinstance(
        tau, list) else tau
    weighting = PCDWeighting(tau=tau_arg, beta=beta, eps=eps)
    weights = []
    for jac in steps:
      jac_t = torch.tensor(jac, dtype=torch.float64)
      weights.append(weighting(jac_t @ jac_t.T).tolist())
    records.append({"name": name, "tau": tau, "beta": beta, "eps": eps,
                    "jacobians": [np.asarray(j).tolist() for j in steps],
                    "weights": weights})
  OUT.write_text(json.dumps({
      "source": f"torchjd {getattr(torchjd, '__version__', '0.18.0')} "
                f"PCDWeighting, torch {torch.__version__}, float64",
      "cases": records}, indent=1) + "\n")
  print(f"wrote {len(records)} cases to {OUT}")


if __name__ == "__main__":
  main()
