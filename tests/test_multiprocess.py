"""Two processes joined by jax.distributed train like one process.

The program is tests/multiprocess_check.py (it must own its JAX runtime, so
it runs in subprocesses): once without ``jax.distributed``, and as two
processes on this machine with gloo CPU collectives, parameters sharded
across both and the batch split between them. The final parameters of every
training path must agree to float tolerance.
"""

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

SCRIPT = pathlib.Path(__file__).with_name("multiprocess_check.py")
ROOT = SCRIPT.parents[1]


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _env():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  # One CPU device per process: the two processes make the mesh.
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not f.startswith("--xla_force_host_platform_device_count"))
  return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = tmp_path_factory.mktemp("multiprocess")
  env = _env()
  subprocess.run([sys.executable, str(SCRIPT), "--single", str(out)],
                 env=env, check=True, timeout=600, cwd=ROOT)
  port = str(_free_port())
  procs = [subprocess.Popen(
      [sys.executable, str(SCRIPT), "--process-id", str(i), "--port", port,
       str(out)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = [p.communicate(timeout=600)[0] for p in procs]
  for proc, log in zip(procs, logs):
    assert proc.returncode == 0, log[-3000:]
  return np.load(out / "single.npz"), np.load(out / "multi.npz")


@pytest.mark.slow
def test_two_processes_match_one(runs):
  single, multi = runs
  assert set(single.files) == set(multi.files)
  assert any(name.startswith("stacked_mgda") for name in single.files)
  assert any(name.startswith("gram_first_mgda") for name in single.files)
  for name in single.files:
    np.testing.assert_allclose(multi[name], single[name], rtol=2e-5,
                               atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_training_moved_the_parameters(runs):
  single, _ = runs
  np.testing.assert_allclose(single["gram_first_mgda['heads']"],
                             single["stacked_mgda['heads']"], rtol=1e-4,
                             atol=1e-6)
  kernel = single["stacked_mgda['trunk']['kernel']"]
  rng = np.random.default_rng(0)
  initial = rng.normal(size=kernel.shape).astype(np.float32)
  assert np.max(np.abs(kernel - initial)) > 1e-4
