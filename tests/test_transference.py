"""Transference / TAG / IT-MTL against direct computations and brute force."""

from __future__ import annotations

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mtl_optax as mo
from mtl_optax import masked_loss_fn

DATA = os.path.join(os.path.dirname(__file__), "data",
                    "tag_published_affinities.json")


# --------------------------------------------------------------------------
# A small multi-task regression: shared tanh trunk, one linear head per task.
# Tasks 0 and 1 share a target, task 2 has the opposite one, task 3 an
# unrelated one; all heads start equal, so at the start the trunk gradients of
# tasks 0/1 are aligned and those of 0/2 opposed.

K = 4


def _mlp_loss(p, data):
  x, y = data
  z = jnp.tanh(x @ p["trunk"]["w"] + p["trunk"]["b"])
  pred = z @ p["heads"].T
  return 0.5 * jnp.mean((pred - y) ** 2, axis=0)


def _problem_data(seed=0, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(32, 5))
  target = np.tanh(x @ rng.normal(size=5))
  other = np.tanh(x @ rng.normal(size=5))
  y = np.stack([target, target, -target, other], axis=1)
  head = rng.normal(size=6)
  params = {"trunk": {"w": jnp.asarray(0.3 * rng.normal(size=(5, 6)), dtype),
                      "b": jnp.zeros(6, dtype)},
            "heads": jnp.asarray(np.tile(head, (K, 1)) * 0.1, dtype)}
  return params, (jnp.asarray(x, dtype), jnp.asarray(y, dtype))


def _problem(seed=0, dtype=jnp.float64):
  params, data = _problem_data(seed, dtype)
  return params, lambda p: _mlp_loss(p, data)


SHARED = {"trunk": True, "heads": False}


def _move(params, grads_i, lr, shared=SHARED, velocity=None, mu=0.9, wd=0.0):
  """Direct look-ahead: theta + mu v - lr (g + wd theta) on shared leaves."""
  out = dict(params)
  for key, is_shared in shared.items():
    if not is_shared:
      continue
    vel = velocity[key] if velocity is not None else jax.tree.map(
        jnp.zeros_like, params[key])
    out[key] = jax.tree.map(lambda p, g, v: p + mu * v - lr * (g + wd * p),
                            params[key], grads_i[key], vel)
  return out


def _loop_affinity(loss_fn, params, grads, lr, **kw):
  """Z row by row with a Python loop over the stepping task (the oracle)."""
  before = np.asarray(loss_fn(params), np.float64)
  rows = []
  for i in range(K):
    g_i = jax.tree.map(lambda g: g[i], grads)
    after = np.asarray(loss_fn(_move(params, g_i, lr, **kw)), np.float64)
    rows.append(1.0 - after / before)
  return np.stack(rows)


@pytest.fixture(scope="module")
def mlp():
  with jax.enable_x64(True):
    params, loss_fn = _problem()
    losses, grads = mo.value_and_task_grads(loss_fn)(params)
  return params, loss_fn, losses, grads


def test_affinity_signs_and_vmap_equals_python_loop(mlp):
  params, loss_fn, _, grads = mlp
  with jax.enable_x64(True):
    z = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.5,
                                    shared_mask=SHARED))
    oracle = _loop_affinity(loss_fn, params, grads, 0.5)
  np.testing.assert_allclose(z, oracle, rtol=1e-10, atol=1e-12)
  # Aligned tasks help each other, opposed tasks hurt each other.
  assert z[0, 1] > 0 and z[1, 0] > 0
  assert z[0, 2] < 0 and z[2, 0] < 0 and z[1, 2] < 0 and z[2, 1] < 0
  assert np.all(np.diag(z) > 0)


def test_affinity_first_order_is_loss_normalised_inner_product(mlp):
  params, loss_fn, losses, grads = mlp
  trunk = [g.reshape(K, -1) for g in jax.tree.leaves(grads["trunk"])]
  inner = sum(np.asarray(g) @ np.asarray(g).T for g in trunk)
  errors = []
  for lr in (1e-3, 1e-4):
    with jax.enable_x64(True):
      z = np.asarray(mo.task_affinity(loss_fn, params, grads, lr,
                                      shared_mask=SHARED))
    first_order = lr * inner / np.asarray(losses)[None, :]
    np.testing.assert_allclose(z, first_order, rtol=2e-2,
                               atol=1e-3 * np.abs(first_order).max())
    errors.append(np.abs(z - first_order).max())
  # The remainder is second order in lr.
  assert 50 < errors[0] / errors[1] < 200, errors


def test_affinity_momentum_weight_decay_and_lr_scale(mlp):
  params, loss_fn, _, grads = mlp
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    velocity = jax.tree.map(
        lambda p: jnp.asarray(0.01 * rng.normal(size=p.shape)), params)
    z = np.asarray(mo.task_affinity(
        loss_fn, params, grads, 0.2, shared_mask=SHARED, momentum=velocity,
        momentum_decay=0.8, weight_decay=1e-2))
    oracle = _loop_affinity(loss_fn, params, grads, 0.2, velocity=velocity,
                            mu=0.8, wd=1e-2)
    np.testing.assert_allclose(z, oracle, rtol=1e-10, atol=1e-12)
    plain = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.2,
                                        shared_mask=SHARED))
    scaled = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.2,
                                         shared_mask=SHARED,
                                         normalize_by_lr=True))
  np.testing.assert_allclose(scaled, plain / 0.2, rtol=1e-12)
  assert np.abs(z - plain).max() > 1e-4  # the momentum term matters here


def test_only_shared_leaves_move(mlp):
  params, loss_fn, losses, grads = mlp
  with jax.enable_x64(True):
    by_bool = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.3,
                                          shared_mask=SHARED))
    labels = {"trunk": {"w": "shared", "b": "shared"}, "heads": "task"}
    by_label = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.3,
                                           shared_mask=labels))
    everything = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.3))
    # Given the current losses, the look-ahead is only K rows.
    given = np.asarray(mo.task_affinity(loss_fn, params, grads, 0.3,
                                        shared_mask=SHARED, losses=losses))
    # A loss that depends on the heads only cannot change if they are frozen.
    heads_only = lambda p: jnp.sum(p["heads"] ** 2, axis=1) + 1.0
    _, head_grads = mo.value_and_task_grads(heads_only)(params)
    frozen = np.asarray(mo.task_affinity(heads_only, params, head_grads, 0.3,
                                         shared_mask=SHARED))
  np.testing.assert_array_equal(by_bool, by_label)
  np.testing.assert_allclose(given, by_bool, rtol=1e-12, atol=1e-14)
  np.testing.assert_array_equal(frozen, np.zeros((K, K)))
  # Heads are task-specific (g_i is zero on head j != i): moving them changes
  # only the diagonal.
  off = ~np.eye(K, dtype=bool)
  np.testing.assert_allclose(everything[off], by_bool[off], rtol=1e-12)
  assert np.all(np.abs(np.diag(everything) - np.diag(by_bool)) > 1e-6)


def test_affinity_one_vmapped_call_and_jit():
  calls = []
  targets = jnp.array([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.5]])

  def loss_fn(w):
    calls.append(1)
    return jnp.sum((w - targets) ** 2, axis=1)

  w = jnp.array([0.2, -0.1])
  _, grads = mo.value_and_task_grads(loss_fn)(w)
  calls.clear()
  eager = mo.task_affinity(loss_fn, w, grads, 0.1)
  assert len(calls) == 1  # base point and K look-aheads: one vmapped trace
  jitted = jax.jit(lambda w, g: mo.task_affinity(loss_fn, w, g, 0.1))(w, grads)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6)


def test_affinity_degenerate_and_nonfinite():
  w = jnp.array([0.0, 0.0])
  # Task 1 sits at zero loss (and zero gradient); a step on task 0 moves it.
  loss_fn = lambda w: jnp.stack([jnp.sum((w - 1.0) ** 2), (w[0] - w[1]) ** 2
                                 + w[0] ** 2, jnp.sum(w * 0.0)])
  _, grads = mo.value_and_task_grads(loss_fn)(w)
  z = np.asarray(mo.task_affinity(loss_fn, w, grads, 0.1))
  assert np.all(np.isfinite(z))
  np.testing.assert_array_equal(z[:, 1:], 0.0)
  np.testing.assert_allclose(z[0, 0], 1 - (2 * 0.8 ** 2) / 2, rtol=1e-6)
  # Negative losses: Z > 0 still means "the loss went down".
  neg = lambda w: jnp.stack([jnp.sum((w - 1.0) ** 2) - 5.0,
                             jnp.sum((w - 1.0) ** 2) - 5.0])
  _, g = mo.value_and_task_grads(neg)(w)
  assert np.all(np.asarray(mo.task_affinity(neg, w, g, 0.1)) > 0)
  # NaN propagates.
  bad = grads.at[0, 0].set(jnp.nan)
  z = np.asarray(mo.task_affinity(loss_fn, w, bad, 0.1))
  assert np.isnan(z[0, 0]) and np.all(np.isfinite(z[1:, 0]))


def test_affinity_input_errors(mlp):
  params, loss_fn, _, grads = mlp
  with pytest.raises(ValueError, match="prefix"):
    mo.task_affinity(loss_fn, params, grads, 0.1, shared_mask={"x": True})
  with pytest.raises(TypeError, match="callable"):
    mo.task_affinity(loss_fn, params, grads, 0.1, shared_mask=lambda p: p)
  with pytest.raises(ValueError, match="leading task axis"):
    mo.task_affinity(loss_fn, params, params, 0.1)


# --------------------------------------------------------------------------
# track_affinity


def _batch_loss(w, targets):
  return jnp.sum((w - targets) ** 2, axis=1) + 0.5


def _batches(num):
  rng = np.random.default_rng(1)
  return [jnp.asarray(rng.normal(size=(3, 2))) for _ in range(num)]


def test_track_affinity_passes_through_and_averages_every_n_steps():
  every, steps, lr = 3, 7, 0.05
  tracker = mo.track_affinity(3, lr, update_every=every)
  tx = optax.chain(tracker, mo.cagrad(3), optax.sgd(0.1))
  reference = optax.chain(mo.cagrad(3), optax.sgd(0.1))

  @jax.jit
  def step(w, state, ref_state, batch):
    loss_fn = lambda p: _batch_loss(p, batch)
    losses, grads = mo.value_and_task_grads(loss_fn)(w)
    passed, _ = tracker.update(grads, state[0], w, loss_fn=loss_fn)
    z = mo.task_affinity(loss_fn, w, grads, lr)
    updates, state = tx.update(grads, state, w, loss_fn=loss_fn,
                               task_losses=losses)
    ref_updates, ref_state = reference.update(grads, ref_state, w)
    return grads, passed, z, updates, state, ref_updates, ref_state

  w = jnp.array([0.3, -0.2])
  state, ref_state = tx.init(w), reference.init(w)
  expected = []
  for t, batch in enumerate(_batches(steps)):
    grads, passed, z, updates, state, ref_updates, ref_state = step(
        w, state, ref_state, batch)
    np.testing.assert_array_equal(passed, grads)  # stacked, unchanged
    np.testing.assert_allclose(updates, ref_updates, rtol=1e-6)
    if t % every == 0:
      expected.append(np.asarray(z))
    w = optax.apply_updates(w, updates)
  track = state[0]
  assert int(track.num_averaged) == 3 and int(track.count) == steps
  np.testing.assert_allclose(track.affinity, np.mean(expected, axis=0),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(track.last_affinity, expected[-1], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(track.weights, np.full(3, 1 / 3))
  np.testing.assert_allclose(optax.tree.get(state[1], "weights"),
                             ref_state[0].weights, rtol=1e-6)


def test_track_affinity_skips_the_lookahead_with_cond():
  batch = _batches(1)[0]
  loss_fn = lambda p: _batch_loss(p, batch)
  w = jnp.array([0.3, -0.2])
  _, grads = mo.value_and_task_grads(loss_fn)(w)
  tx = mo.track_affinity(3, 0.1, update_every=10)
  jaxpr = str(jax.make_jaxpr(
      lambda g, s: tx.update(g, s, w, loss_fn=loss_fn))(grads, tx.init(w)))
  assert "cond" in jaxpr
  # Off-steps keep the average.
  state = tx.init(w)
  _, state = tx.update(grads, state, w, loss_fn=loss_fn)
  first = np.asarray(state.affinity)
  _, state = tx.update(2 * grads, state, w, loss_fn=loss_fn)
  np.testing.assert_array_equal(state.affinity, first)
  assert int(state.num_averaged) == 1 and int(state.count) == 2
  with pytest.warns(DeprecationWarning, match=r"step is deprecated: use \.count"):
    assert int(state.step) == 2


def test_track_affinity_wrapping_inner_and_partition():
  tx = optax.partition(
      {"shared": mo.track_affinity(K, 0.2, inner=mo.mgda(K),
                                   normalize_by_lr=True),
       "head": mo.task_sum(K)},
      {"trunk": "shared", "heads": "head"})
  mgda = mo.mgda(K)

  @jax.jit
  def run(params, data):
    loss_fn = lambda p: _mlp_loss(p, data)
    losses, grads = mo.value_and_task_grads(loss_fn)(params)
    updates, state = tx.update(grads, tx.init(params), params,
                               task_losses=losses,
                               loss_fn=masked_loss_fn(loss_fn, params))
    ref, ref_state = mgda.update(grads["trunk"], mgda.init(params["trunk"]))
    z = mo.task_affinity(loss_fn, params, grads, 0.2, shared_mask=SHARED,
                         normalize_by_lr=True)
    return updates, state, ref, ref_state, z

  with jax.enable_x64(True):
    updates, state, ref, ref_state, z = run(*_problem_data(seed=2))
  for a, b in zip(jax.tree.leaves(updates["trunk"]), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-9)
  # One `weights` in the method's state: the inner method's.
  shared = state.inner_states["shared"]
  np.testing.assert_allclose(optax.tree.get(shared, "weights"),
                             ref_state.weights, rtol=1e-9)
  np.testing.assert_allclose(optax.tree.get(shared, "affinity"), z,
                             rtol=1e-9)


def test_track_affinity_nan_keeps_state_and_errors():
  batch = _batches(1)[0]
  loss_fn = lambda p: _batch_loss(p, batch)
  w = jnp.array([0.3, -0.2])
  _, grads = mo.value_and_task_grads(loss_fn)(w)
  tx = mo.track_affinity(3, 0.1, update_every=1)
  _, state = tx.update(grads, tx.init(w), w, loss_fn=loss_fn)
  out, bad = tx.update(grads.at[1, 0].set(jnp.nan), state, w, loss_fn=loss_fn)
  assert np.isnan(out[1, 0])
  for a, b in zip(jax.tree.leaves(bad), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="loss_fn"):
    tx.update(grads, state, w)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state, None, loss_fn=loss_fn)
  with pytest.raises(ValueError, match="update_every"):
    mo.track_affinity(3, 0.1, update_every=0)
  with pytest.warns(DeprecationWarning, match="update_every"):
    mo.track_affinity(3, 0.1, every=2)


# --------------------------------------------------------------------------
# IT-MTL


def _candidates(num_tasks):
  return (mo.linear_scalarization(num_tasks), mo.pcgrad(num_tasks, seed=4),
          mo.mgda(num_tasks), mo.linear_scalarization(num_tasks, (1.0,) + (0.0,) * (
              num_tasks - 1)))


@pytest.mark.parametrize("criterion", ["loss", "transference"])
def test_it_mtl_picks_the_best_lookahead(criterion):
  lr = 0.3
  cands = _candidates(K)
  tx = mo.it_mtl(K, cands, lookahead_lr=lr, criterion=criterion)

  @jax.jit
  def run(params, data):
    loss_fn = lambda p: _mlp_loss(p, data)
    losses, grads = mo.value_and_task_grads(loss_fn)(params)
    update, state = tx.update(grads, tx.init(params), params, loss_fn=loss_fn,
                              task_losses=losses)
    # The oracle: every candidate's own update, looked ahead one at a time.
    proposals, weights, after = [], [], []
    for c in cands:
      d, s = c.update(grads, c.init(params), params)
      proposals.append(d)
      weights.append(optax.tree.get(s, "weights"))
      after.append(loss_fn(jax.tree.map(lambda p, u: p - lr * u, params, d)))
    return update, state, losses, proposals, weights, after

  choices = set()
  with jax.enable_x64(True):
    for seed in (0, 3, 5):
      params, data = _problem_data(seed=seed + 10)
      params = {"trunk": params["trunk"],
                "heads": params["heads"] + 0.3 * seed * jnp.eye(K, 6)}
      update, state, losses, proposals, weights, after = run(params, data)
      after, before = np.asarray(after), np.asarray(losses)
      scores = (after.sum(1) if criterion == "loss"
                else np.sum(1 - after / before, axis=1))
      best = int(np.argmin(scores) if criterion == "loss"
                 else np.argmax(scores))
      assert int(state.choice) == best
      choices.add(best)
      np.testing.assert_allclose(state.scores, scores, rtol=1e-8)
      np.testing.assert_allclose(state.weights, weights[best], rtol=1e-8)
      assert int(state.wins[best]) == 1 and int(state.wins.sum()) == 1
      for a, b in zip(jax.tree.leaves(update),
                      jax.tree.leaves(proposals[best])):
        np.testing.assert_allclose(a, b, rtol=1e-9)
  assert len(choices) >= 2, choices  # the problems exercise the selection


def test_it_mtl_one_vmapped_call_state_and_nan():
  calls = []
  targets = jnp.array([[1.0, 0.0], [-1.0, 0.5], [0.0, 2.0]])

  def loss_fn(w):
    calls.append(1)
    return jnp.sum((w - targets) ** 2, axis=1)

  w = jnp.array([0.2, -0.1])
  _, grads = mo.value_and_task_grads(loss_fn)(w)
  tx = mo.it_mtl(3, lookahead_lr=0.1)
  step = jax.jit(lambda g, s: tx.update(g, s, w, loss_fn=loss_fn))
  calls.clear()
  _, state = step(grads, tx.init(w))
  assert len(calls) == 1  # the candidates' look-aheads: one vmapped trace
  assert optax.tree.get(state, "weights").shape == (3,)  # one match only
  out, bad = step(grads.at[0, 0].set(jnp.nan), state)
  assert np.isnan(np.asarray(out)).any()
  for a, b in zip(jax.tree.leaves(bad), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="loss_fn"):
    tx.update(grads, state, w)
  with pytest.raises(ValueError, match="criterion"):
    mo.it_mtl(3, criterion="best")


# --------------------------------------------------------------------------
# TAG network selection


@pytest.fixture(scope="module")
def published():
  with open(DATA) as f:
    return json.load(f)


def _as_sets(groups):
  return {frozenset(g) for g in groups}


@pytest.mark.parametrize("dataset,budget", [
    ("taskonomy", 1), ("taskonomy", 2), ("taskonomy", 3), ("taskonomy", 4),
    ("celeba", 2), ("celeba", 3)])
def test_select_task_groups_reproduces_published_networks(published, dataset,
                                                          budget):
  expected = published["expected"][dataset][str(budget)]
  result = mo.select_task_groups(published[dataset], budget)
  assert _as_sets(result.groups) == _as_sets(expected["groups"])
  decimals = 4 if dataset == "taskonomy" else 2
  assert round(result.score, decimals) == expected["score"]
  # The score is the mean of each task's best score among the chosen groups.
  names = list(published[dataset])
  d = published[dataset]
  for a, name in enumerate(names):
    group = result.groups[result.served_by[a]]
    assert name in group
    own = np.mean([d[name][b] for b in group if b != name])
    np.testing.assert_allclose(result.task_scores[a], own, rtol=1e-12)
  np.testing.assert_allclose(result.score, np.mean(result.task_scores))


def test_select_task_groups_celeba_budget_4_and_orientation(published):
  celeba = published["celeba"]
  names = list(celeba)
  b3 = mo.select_task_groups(celeba, 3)
  b4 = mo.select_task_groups(celeba, 4)
  assert len(b4.groups) <= 4 and b4.score >= b3.score
  assert set().union(*b4.groups) == set(names)
  # The array form takes Z[i, j] = D[j][i] (our orientation).
  z = np.array([[celeba[b][a] for b in names] for a in names])
  from_array = mo.select_task_groups(z, 4, task_names=names)
  assert from_array.groups == b4.groups and from_array.score == b4.score
  # Transposing the matrix is a different problem.
  assert mo.select_task_groups(z.T, 3, task_names=names).groups != b3.groups


def _brute_force(z, budget, singleton=-1e6):
  """The notebook's exhaustive search over every collection of subsets."""
  k = len(z)
  subsets = [s for r in range(1, k + 1)
             for s in itertools.combinations(range(k), r)]
  scores = np.full((len(subsets), k), -np.inf)
  for n, s in enumerate(subsets):
    for a in s:
      scores[n, a] = singleton if len(s) == 1 else np.mean(
          [z[b, a] for b in s if b != a])
  best, best_sets = -np.inf, []
  for size in range(1, budget + 1):
    combos = np.array(list(itertools.combinations(range(len(subsets)), size)))
    values = scores[combos].max(axis=1).mean(axis=1)  # -inf if uncovered
    top = values.max()
    if top > best + 1e-12:
      best = top
      best_sets = [{subsets[i] for i in combos[j]}
                   for j in np.flatnonzero(values >= top - 1e-12)]
  return best, best_sets


@pytest.mark.parametrize("num_tasks,budgets", [(5, (1, 2, 3, 4)),
                                               (6, (1, 2, 3))])
def test_select_task_groups_matches_brute_force(num_tasks, budgets):
  rng = np.random.default_rng(num_tasks)
  for trial in range(3):
    z = rng.normal(size=(num_tasks, num_tasks))
    if trial == 2:  # mostly negative, as on CelebA
      z = z - 2.0
    for budget in budgets:
      result = mo.select_task_groups(z, budget)
      score, optimal_sets = _brute_force(z, budget)
      np.testing.assert_allclose(result.score, score, rtol=1e-12, atol=1e-12)
      assert set(result.groups) in optimal_sets or any(
          set(result.groups) <= s for s in optimal_sets)


def test_select_task_groups_input_errors():
  with pytest.raises(ValueError, match="budget"):
    mo.select_task_groups(np.eye(3), 0)
  with pytest.raises(ValueError, match="square"):
    mo.select_task_groups(np.ones((2, 3)), 1)
  with pytest.raises(ValueError, match="non-finite"):
    mo.select_task_groups(np.full((3, 3), np.nan), 1)
  single = mo.select_task_groups(np.zeros((1, 1)), 2)
  assert single.groups == ((0,),) and single.score == -1e6


def _it_mtl_pair():
  return (mo.linear_scalarization(2), mo.linear_scalarization(2, (0.0, 1.0)))


@pytest.mark.parametrize("jit", [False, True])
def test_it_mtl_scores_stay_finite_for_extreme_scales(jit):
  """Mixed 1e30/1e-30 gradients: the mean's look-ahead multiplies a 1e-30
  loss by ~1e66 (the ratio overflows float32); its score saturates at
  -finfo.max instead of -inf, the other candidate wins."""
  lr = 1e-3
  grads = jnp.array([[1e30, 0.0], [0.0, 1e-30]])

  def loss_fn(p):
    return jnp.stack([1e-30 + 1e10 * jnp.abs(p[0]), 1.0 + p[1]])

  w = jnp.zeros(2)
  tx = mo.it_mtl(2, _it_mtl_pair(), lookahead_lr=lr)
  step = lambda g, s: tx.update(g, s, w, loss_fn=loss_fn)
  step = jax.jit(step) if jit else step
  update, state = step(grads, tx.init(w))
  # Oracle in float64: each candidate's transference sum, then the clip.
  g = np.asarray(grads, np.float64)
  before = np.array([1e-30, 1.0])
  oracle = []
  for d in (g.mean(0), g[1]):
    p = -lr * d
    after = np.array([1e-30 + 1e10 * abs(p[0]), 1.0 + p[1]])
    oracle.append(np.sum((before - after) / before))
  big = np.finfo(np.float32).max
  np.testing.assert_allclose(state.scores, np.clip(oracle, -big, big),
                             rtol=1e-5)
  assert oracle[0] < -big and int(state.choice) == 1
  np.testing.assert_array_equal(update, grads[1])
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("criterion", ["transference", "loss"])
def test_it_mtl_non_finite_lookahead_propagates_and_keeps_state(criterion,
                                                                jit):
  """A non-finite loss at the current point (or in task_losses): NaN update,
  skipped by apply_if_finite, state kept. A bad look-ahead loses and scores
  0; with none finite the first candidate is applied, scores finite."""
  w = jnp.array([0.5, 0.5])
  grads = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  good = lambda p: jnp.sum((p[None] - jnp.eye(2)) ** 2, axis=1)
  nan_ahead = lambda p: jnp.where(jnp.all(p == w), good(p), jnp.nan)
  inf_here = lambda p: good(p).at[0].set(jnp.where(jnp.all(p == w), jnp.inf,
                                                   1.0))
  # The constant (0, 1) candidate moves only p[1]: NaN there.
  half_bad = lambda p: jnp.where((p[0] == w[0]) & (p[1] != w[1]), jnp.nan,
                                 good(p))
  method = mo.it_mtl(2, _it_mtl_pair(), lookahead_lr=0.1, criterion=criterion)
  tx = optax.chain(method, optax.apply_if_finite(optax.sgd(0.1), 3))

  def run(loss_fn, state, losses=jnp.ones(2)):
    f = lambda g, s, l: tx.update(g, s, w, loss_fn=loss_fn, task_losses=l)
    return (jax.jit(f) if jit else f)(grads, state, losses)

  _, state = run(good, tx.init(w))
  cases = [(good, jnp.array([1.0, jnp.inf]))]
  if criterion == "transference":
    cases.append((inf_here, jnp.ones(2)))
  for bad, losses in cases:
    updates, new_state = run(bad, state, losses)
    np.testing.assert_array_equal(updates, np.zeros(2))
    assert int(new_state[1].notfinite_count) == 1
    for old, new in zip(jax.tree.leaves(state[0]),
                        jax.tree.leaves(new_state[0])):
      np.testing.assert_array_equal(old, new)
  for loss_fn in (half_bad, nan_ahead):
    updates, new_state = run(loss_fn, state)
    assert int(new_state[0].choice) == 0
    np.testing.assert_allclose(updates, -0.1 * grads.mean(0))
    assert np.all(np.isfinite(np.asarray(new_state[0].scores)))
    assert int(new_state[1].notfinite_count) == 0


def test_it_mtl_mismatched_params_tree_is_a_clear_error():
  tx = mo.it_mtl(2)
  params = {"a": jnp.zeros(2)}
  grads = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 3))}
  # The shared builder's check comes first: it names both trees' sizes.
  with pytest.raises(ValueError, match=r"it_mtl: updates has 2 leaves but "
                     r"params has 1"):
    tx.update(grads, tx.init(params), params, loss_fn=lambda p: jnp.ones(2))
