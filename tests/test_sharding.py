"""Scale-out on 8 simulated CPU devices.

The checks run in a subprocess (``tests/sharding_check.py``), because
``--xla_force_host_platform_device_count=8`` only takes effect before JAX
initialises and this process has already imported it. The subprocess prints
one JSON report; the tests below assert on it:

* per-task gradients (``mo.value_and_task_grads``) and the update and weights
  of every method present equal the single-device result, with parameters
  sharded FSDP-style and the batch data-parallel;
* the compiled method adds only small all-reduces (the K x K Gram matrix,
  finiteness flags, K-vectors), never an all-gather of a gradient;
* a full jitted training step equals the single-device step.

Known limitations are marked ``xfail`` (not strict) with the reason, so that
they show up as XPASS once fixed.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

# One subprocess compiles every method on 8 devices (about two minutes).
pytestmark = pytest.mark.slow

SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")
NUM_TASKS = 3
TOL = 1e-4          # sharded vs single device, relative to the largest entry
STEP_TOL = 1e-3     # one adam step (its normalisation amplifies float noise)
REQUIRED_GRAM = ("mgda", "cagrad", "pcgrad")

AUTO_STEP = (
    "under GSPMD ('Auto' axes) the partitioner all-gathers K-leading "
    "cotangents inside the vmapped backward of value_and_task_grads "
    "(op_name vmap(transpose(jvp()))), not in the method; with explicit axes, "
    "or with value_and_task_grads(chunk_size=1) (the default 'auto' on a "
    "CPU), the step is clean.")


@pytest.fixture(scope="module")
def report():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # the script sets its own
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, str(SCRIPT)], env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _group(report, layout, group):
  entry = report["layouts"][layout]
  assert "error" not in entry, entry["error"]
  if group not in entry["groups"]:
    pytest.skip(f"no {group} method in this build")
  return entry["groups"][group]


def _size(dims):
  return math.prod(dims) if dims else 1


def _assert_same_as_single_device(entry):
  assert "error" not in entry, entry["error"]
  for name, err in entry["update_err"].items():
    assert err < TOL, (name, err)
  for name, err in entry["weights_err"].items():
    assert err < TOL, (name, err)


def _assert_only_small_all_reduces(entry):
  """Only all-reduces, each operand at most K x K (the Gram matrix)."""
  assert "error" not in entry, entry["error"]
  for op, shapes in entry["collectives"]:
    assert op == "all-reduce", (op, shapes)
    for _, dims in shapes:
      assert _size(dims) <= NUM_TASKS * NUM_TASKS, (op, dims)


def _no_gradient_all_gather(step):
  """No all-gather (or all-to-all) of a K-leading, larger than K x K array."""
  assert "error" not in step, step["error"]
  for op, shapes in step["collectives"]:
    for _, dims in shapes:
      big_task_array = (dims and dims[0] == NUM_TASKS
                        and _size(dims) > NUM_TASKS * NUM_TASKS)
      assert not (op in ("all-gather", "all-to-all") and big_task_array), (
          op, dims)


def test_runs_on_eight_devices_with_the_gram_methods(report):
  assert report["devices"] == 8
  gram = report["layouts"]["fsdp"]["groups"]["gram"]["methods"]
  for name in REQUIRED_GRAM:
    assert name in gram


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_trailing", "explicit"])
def test_task_grads_match_single_device(report, layout):
  entry = report["layouts"][layout]
  assert "grads_error" not in entry, entry["grads_error"]
  assert entry["losses_err"] < TOL
  assert entry["grads_err"] < TOL
  # Every stacked gradient leaf stays split along the parameter's axis.
  assert all("fsdp" in spec for spec in entry["grads_specs"])
  assert all(spec.startswith("P(None,") for spec in entry["grads_specs"])


@pytest.mark.parametrize("group", ["gram", "coordinatewise", "fixed"])
def test_methods_match_single_device(report, group):
  entry = _group(report, "fsdp", group)
  _assert_same_as_single_device(entry)
  # The update is sharded like the parameters: nothing was gathered for it.
  assert all("fsdp" in spec for spec in entry["update_specs"])


@pytest.mark.parametrize("group", ["gram", "coordinatewise", "fixed"])
def test_method_traffic_is_small_all_reduces(report, group):
  _assert_only_small_all_reduces(_group(report, "fsdp", group))


@pytest.mark.parametrize("group", ["gram", "coordinatewise"])
def test_trailing_axis_layout_matches_single_device(report, group):
  _assert_same_as_single_device(_group(report, "fsdp_trailing", group))


@pytest.mark.parametrize("group", ["gram", "coordinatewise"])
def test_trailing_axis_layout_traffic(report, group):
  _assert_only_small_all_reduces(_group(report, "fsdp_trailing", group))


@pytest.mark.parametrize("group", ["gram", "coordinatewise"])
def test_explicit_mesh(report, group):
  entry = _group(report, "explicit", group)
  _assert_same_as_single_device(entry)
  _assert_only_small_all_reduces(entry)


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_trailing", "explicit"])
def test_train_step_matches_single_device(report, layout):
  step = report["layouts"][layout]["train_step"]
  assert "error" not in step, step["error"]
  assert step["params_err"] < STEP_TOL


@pytest.mark.parametrize("layout", [
    pytest.param("fsdp", marks=pytest.mark.xfail(reason=AUTO_STEP)),
    pytest.param("fsdp_trailing", marks=pytest.mark.xfail(reason=AUTO_STEP)),
    "explicit",
])
def test_train_step_has_no_gradient_all_gather(report, layout):
  _no_gradient_all_gather(report["layouts"][layout]["train_step"])


@pytest.mark.parametrize("layout", ["fsdp", "fsdp_trailing", "explicit"])
def test_chunked_train_step_is_clean_and_matches_single_device(report,
                                                               layout):
  """One backward pass per task (chunk_size=1): no K-leading cotangent
  exists, so even GSPMD's auto axes gather no per-task array, and the step
  equals the single-device step."""
  step = report["layouts"][layout]["train_step_chunked"]
  assert "error" not in step, step["error"]
  assert step["params_err"] < STEP_TOL
  _no_gradient_all_gather(step)
