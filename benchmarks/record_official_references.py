"""Records reference values of COSMOS, PBI, M-ConFIG, Auto-Lambda and LDC-MTL
from their official PyTorch code, for tests/test_scalarization.py,
tests/test_momentum.py and tests/test_meta_weighting.py.

Needs torch, torchjd==0.18.0 (COSMOS, PBI), the ``conflictfree`` package of
tum-pbs/ConFIG (``MomentumOperator``) and ``auto_lambda.py`` + ``utils.py``
of lorenmt/auto-lambda on ``sys.path`` (``--sources DIR``). LDC-MTL has no
reusable class (its objective is three lines of the official trainers, a
router inside the model); its sequence is the trainers' objective evaluated
by torch autograd with one torch Adam on the model and a logit router. At the
first step every normalised loss equals min L(0) in exact arithmetic; the
values are set exactly so that the signs of the penalty's |0| terms do not
come from rounding (as in ``mo.ldc_mtl``).

    python benchmarks/record_official_references.py --sources /path/to/dir \
        --out tests/data/official_new_methods.json
"""

import argparse
import json
import sys

import numpy as np


def _scalarizations(torch):
  from torchjd.scalarization import COSMOS, PBI
  rng = np.random.default_rng(0)
  cosmos, pbi = [], []
  for k in (2, 3, 5):
    for _ in range(3):
      losses = rng.uniform(0.1, 3.0, k)
      pref = rng.dirichlet(np.ones(k))
      lam = float(rng.uniform(0.0, 4.0))
      theta = float(rng.uniform(0.0, 8.0))
      reference = rng.uniform(-0.5, 0.05, k)
      for name, make, extra, out in (
          ("cosmos", lambda p: COSMOS(lam, p), {"lambda_": lam}, cosmos),
          ("pbi", lambda p: PBI(theta, p, torch.tensor(reference)),
           {"theta": theta, "reference": reference.tolist()}, pbi)):
        x = torch.tensor(losses, requires_grad=True)
        make(torch.tensor(pref))(x).backward()
        out.append({"losses": losses.tolist(), "pref": pref.tolist(),
                    "grad": x.grad.numpy().tolist(), **extra})
  return {"cosmos": cosmos, "pbi": pbi}


def _momentum_config(torch):
  from conflictfree.momentum_operator import PseudoMomentumOperator
  rng = np.random.default_rng(1)
  out = []
  for k in (2, 3):
    grads = rng.normal(size=(10, k, 5)).astype(np.float32)
    grads[:, 0] *= 3.0
    op = PseudoMomentumOperator(num_vectors=k)
    updates = []
    for n in range(grads.shape[0]):
      task = n % k
      updates.append(op.calculate_gradient(
          task, torch.tensor(grads[n, task])).numpy().tolist())
    out.append({"num_tasks": k, "grads": grads.tolist(), "updates": updates})
  return out


def _quadratic_problem(rng, k, n, p):
  return (rng.normal(size=(k, n, p)), rng.normal(size=(k, n)))


def _auto_lambda(torch):
  from auto_lambda import AutoLambda
  rng = np.random.default_rng(2)
  k, p = 3, 4
  x_tr, y_tr = _quadratic_problem(rng, k, 6, p)
  x_val, y_val = _quadratic_problem(rng, k, 6, p)
  theta0 = rng.normal(size=p)
  lr, meta_lr, init, steps = 0.05, 0.05, 0.1, 6

  class Linear(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.theta = torch.nn.Parameter(torch.tensor(theta0))

    def forward(self, x):
      return [x[i] @ self.theta for i in range(k)]

  class Quadratic(AutoLambda):
    def model_fit(self, pred, targets):
      return [0.5 * torch.mean((pred[i] - targets[i]) ** 2) for i in range(k)]

  model = Linear()
  tasks = list(range(k))
  autol = Quadratic(model, "cpu", tasks, tasks, init)
  meta_opt = torch.optim.Adam([autol.meta_weights], lr=meta_lr)
  opt = torch.optim.SGD(model.parameters(), lr=lr)
  t = lambda a: torch.tensor(a)
  meta, thetas = [], []
  for _ in range(steps):
    meta_opt.zero_grad()
    autol.unrolled_backward(t(x_tr), t(y_tr), t(x_val), t(y_val), lr, opt)
    meta_opt.step()
    opt.zero_grad()
    losses = autol.model_fit(model(t(x_tr)), t(y_tr))
    sum(w * losses[i] for i, w in enumerate(autol.meta_weights)).backward()
    opt.step()
    meta.append(autol.meta_weights.detach().numpy().tolist())
    thetas.append(model.theta.detach().numpy().tolist())
  return {"x_train": x_tr.tolist(), "y_train": y_tr.tolist(),
          "x_val": x_val.tolist(), "y_val": y_val.tolist(),
          "theta0": theta0.tolist(), "lr": lr, "meta_lr": meta_lr,
          "weight_init": init, "meta_weights": meta, "thetas": thetas}


def _ldc_mtl(torch):
  rng = np.random.default_rng(3)
  k, p = 3, 4
  x, y = _quadratic_problem(rng, k, 6, p)
  y = y * np.array([[1.0], [3.0], [0.3]])
  theta0 = rng.normal(size=p)
  lr, lamb, steps = 0.05, 0.5, 8
  theta = torch.tensor(theta0, requires_grad=True)
  logits = torch.zeros(k, dtype=torch.float64, requires_grad=True)
  opt = torch.optim.Adam([theta, logits], lr=lr)
  ratios = None
  thetas, weights = [], []
  for _ in range(steps):
    opt.zero_grad()
    losses = torch.stack([0.5 * torch.mean((torch.tensor(x[i]) @ theta
                                            - torch.tensor(y[i])) ** 2)
                          for i in range(k)])
    if ratios is None:
      ratios = losses.detach() / losses.detach().min()
    w = torch.softmax(logits, 0)
    normalized = losses / ratios
    if not thetas:  # every normalised loss is min L(0): no rounding in |0|
      normalized = normalized + (losses.min() - normalized).detach()
    scaled = w * normalized
    total = (w @ normalized) / w.sum() + lamb * torch.sum(
        torch.abs(scaled[:-1] - scaled[1:]))
    total.backward()
    opt.step()
    thetas.append(theta.detach().numpy().tolist())
    weights.append(torch.softmax(logits, 0).detach().numpy().tolist())
  return {"x": x.tolist(), "y": y.tolist(), "theta0": theta0.tolist(),
          "lr": lr, "penalty": lamb, "thetas": thetas, "router": weights}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--sources", required=True)
  parser.add_argument("--out", default="tests/data/official_new_methods.json")
  args = parser.parse_args()
  sys.path.insert(0, args.sources)
  import importlib.metadata
  import torch
  torch.set_default_dtype(torch.float64)
  data = {"torch": torch.__version__, "torchjd": importlib.metadata.version("torchjd"),
          **_scalarizations(torch)}
  torch.set_default_dtype(torch.float32)
  data["momentum_config"] = _momentum_config(torch)
  torch.set_default_dtype(torch.float64)
  data["auto_lambda"] = _auto_lambda(torch)
  data["ldc_mtl"] = _ldc_mtl(torch)
  with open(args.out, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
