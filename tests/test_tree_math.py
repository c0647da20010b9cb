"""Gram matrix, normalisation and weighted sums over stacked trees."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mtl_optax as mo
from mtl_optax._src import tree_math


def _stacked(key, num_tasks, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"a": jax.random.normal(k1, (num_tasks, 3, 4), dtype),
          "b": [jax.random.normal(k2, (num_tasks,), dtype),
                jax.random.normal(k3, (num_tasks, 2, 2, 2), dtype)]}


def _flat(tree):
  leaves = jax.tree.leaves(tree)
  return np.concatenate([np.asarray(l, np.float64).reshape(l.shape[0], -1)
                         for l in leaves], axis=1)


def test_gram_matches_flattened_numpy():
  tree = _stacked(jax.random.PRNGKey(0), 5)
  j = _flat(tree)
  np.testing.assert_allclose(tree_math.gram_matrix(tree), j @ j.T, rtol=1e-5)


def test_gram_accumulates_bf16_in_float32():
  tree = _stacked(jax.random.PRNGKey(1), 3, jnp.bfloat16)
  gram = tree_math.gram_matrix(tree)
  assert gram.dtype == jnp.float32
  j = _flat(tree)
  np.testing.assert_allclose(gram, j @ j.T, rtol=1e-5)


def test_gram_float64_under_x64():
  with jax.enable_x64(True):
    tree = jax.tree.map(lambda x: x.astype(jnp.float64),
                        _stacked(jax.random.PRNGKey(2), 3))
    assert tree_math.gram_matrix(tree).dtype == jnp.float64


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_normalized_gram_is_scale_free(scale):
  tree = _stacked(jax.random.PRNGKey(3), 4)
  reference = tree_math.normalized_gram(tree)
  scaled = jax.tree.map(lambda x: x * jnp.float32(scale), tree)
  out = jax.jit(tree_math.normalized_gram)(scaled)
  assert np.all(np.isfinite(out.gram)) and np.isfinite(out.rms_norm)
  if scale == 0.0:
    np.testing.assert_array_equal(out.gram, 0.0)
    assert float(out.rms_norm) == 0.0
  else:
    np.testing.assert_allclose(out.gram, reference.gram, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.rms_norm / scale, reference.rms_norm,
                               rtol=1e-4)
    np.testing.assert_allclose(np.trace(out.gram), 4.0, rtol=1e-5)


def test_normalized_gram_propagates_nan():
  tree = _stacked(jax.random.PRNGKey(4), 3)
  tree["a"] = tree["a"].at[0, 0, 0].set(jnp.nan)
  assert np.all(np.isnan(tree_math.normalized_gram(tree).gram))


def test_weighted_task_sum_and_mean():
  tree = _stacked(jax.random.PRNGKey(5), 4)
  weights = jnp.array([0.1, -2.0, 0.5, 3.0])
  out = tree_math.weighted_task_sum(weights, tree)
  for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
    np.testing.assert_allclose(got, np.tensordot(weights, leaf, axes=1),
                               rtol=1e-5, atol=1e-6)
  mean = tree_math.task_mean(tree)
  for got, leaf in zip(jax.tree.leaves(mean), jax.tree.leaves(tree)):
    np.testing.assert_allclose(got, leaf.mean(0), rtol=1e-5, atol=1e-6)


def test_weighted_sum_keeps_leaf_dtype():
  tree = _stacked(jax.random.PRNGKey(6), 2, jnp.bfloat16)
  out = tree_math.weighted_task_sum(jnp.array([0.5, 0.5]), tree)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


@pytest.mark.parametrize("flags,takes_dots", [
    ("", True),
    ("--xla_backend_optimization_level=0", True),
    ("--xla_cpu_experimental_ynn_fusion_type=", False),
    ("--xla_cpu_experimental_ynn_fusion_type=elementwise,reduce", False),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,reduce", True),
    # The last occurrence of a flag wins, as in XLA's own parser.
    ("--xla_cpu_experimental_ynn_fusion_type=dot "
     "--xla_cpu_experimental_ynn_fusion_type=", False),
])
def test_cpu_gram_formulation_follows_the_ynn_dot_fusion(monkeypatch, flags,
                                                         takes_dots):
  # The blocked loop only pays where XLA:CPU's YNNPACK fusion takes the dots
  # (its single-threaded contraction); without it Eigen's plain contraction
  # is faster, and the pairwise reductions win from shorter leaves. The
  # backend starts first, with the session's flags: XLA reads XLA_FLAGS once,
  # and the values here are only for the library's reading of them.
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert tree_math._ynn_takes_dots() is takes_dots
  long = 4 * tree_math._cpu_block_size(10)
  assert tree_math._use_blocked_cpu_gram(10, long) is takes_dots
  medium = tree_math._CPU_PAIRWISE_MIN_ELEMENTS_WITHOUT_YNN
  assert tree_math._use_pairwise_cpu_gram(2, 2, medium) is not takes_dots
  assert tree_math._use_pairwise_cpu_gram(
      2, 2, tree_math._CPU_PAIRWISE_MIN_ELEMENTS)
  # Whichever formulation is chosen, the Gram matrix is the same (checked at
  # trace time of a fresh function: the choice is made when tracing).
  rows = np.random.default_rng(2).normal(size=(2, medium)).astype(np.float32)
  got = jax.jit(lambda t: tree_math.gram_matrix(t))({"w": jnp.asarray(rows)})
  expected = rows.astype(np.float64) @ rows.astype(np.float64).T
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("num_tasks,size", [(4, 2 ** 19 + 1001), (40, 40_000)])
def test_blocked_cpu_gram_matches_one_contraction(monkeypatch, num_tasks, size):
  # Long leaves take the blocked CPU path (a fori_loop over slices plus a
  # remainder) where the YNNPACK fusion takes dots (XLA's default); the
  # result must be the plain contraction's.
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "")
  assert tree_math._use_blocked_cpu_gram(num_tasks, size)
  assert not tree_math._use_pairwise_cpu_gram(num_tasks, num_tasks, size)
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(num_tasks, size)).astype(np.float32)
  other = rng.normal(size=(num_tasks, size)).astype(np.float32)
  expected = rows.astype(np.float64) @ other.astype(np.float64).T
  got = tree_math.cross_gram_matrix({"w": jnp.asarray(rows)},
                                    {"w": jnp.asarray(other)})
  np.testing.assert_allclose(got, expected, rtol=1e-4,
                             atol=1e-4 * np.abs(expected).max())
  bf16 = tree_math.gram_matrix(jnp.asarray(rows, jnp.bfloat16))
  assert bf16.dtype == jnp.float32


@pytest.mark.parametrize("num_tasks,other_tasks", [(1, 1), (2, 2), (3, 3),
                                                   (2, 3)])
def test_pairwise_cpu_gram_matches_one_contraction(monkeypatch, num_tasks,
                                                  other_tasks):
  # Two or three tasks take one reduction per pair of rows for long leaves
  # (mirrored pairs reused when both sides are the same tree), over leaves
  # of any rank; the small leaves beside them take one contraction.
  jax.devices()
  monkeypatch.setenv("XLA_FLAGS", "")
  big = tree_math._CPU_PAIRWISE_MIN_ELEMENTS
  assert tree_math._use_pairwise_cpu_gram(num_tasks, other_tasks, big)
  assert not tree_math._use_pairwise_cpu_gram(num_tasks, other_tasks, big - 1)
  rng = np.random.default_rng(1)
  shapes = {"w": (7, 5), "b": (5,), "s": (), "long": (2, big // 2)}
  first = {k: rng.normal(size=(num_tasks,) + v).astype(np.float32)
           for k, v in shapes.items()}
  second = {k: rng.normal(size=(other_tasks,) + v).astype(np.float32)
            for k, v in shapes.items()}
  flat = lambda t: np.concatenate(
      [np.reshape(t[k], (t[k].shape[0], -1)) for k in sorted(t)], 1)
  expected = flat(first).astype(np.float64) @ flat(second).astype(np.float64).T
  got = jax.jit(tree_math.cross_gram_matrix)(
      jax.tree.map(jnp.asarray, first), jax.tree.map(jnp.asarray, second))
  chex.assert_shape(got, (num_tasks, other_tasks))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  gram = jax.jit(tree_math.gram_matrix)(
      jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), first))
  assert gram.dtype == jnp.float32
  np.testing.assert_array_equal(gram, gram.T)
  reference = flat(jax.tree.map(
      lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), first))
  np.testing.assert_allclose(gram, reference @ reference.T, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_zero_size_leaves_contribute_nothing(scale):
  # An empty leaf adds no products; the scale-safe second pass (taken at
  # 1e-30 and 1e30) must not reduce over it either.
  rng = np.random.default_rng(2)
  dense = (rng.normal(size=(3, 4)) * scale).astype(np.float32)
  tree = {"a": jnp.asarray(dense), "e": jnp.zeros((3, 0)),
          "f": jnp.zeros((3, 2, 0))}
  flat = dense.astype(np.float64) / scale
  out = jax.jit(tree_math.normalized_gram)(tree)
  expected = flat @ flat.T
  np.testing.assert_allclose(out.gram, expected / (np.trace(expected) / 3),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.rms_norm / scale,
                             np.sqrt(np.trace(expected) / 3), rtol=1e-5)
  np.testing.assert_allclose(tree_math.task_norms(tree) / scale,
                             np.linalg.norm(flat, axis=1), rtol=1e-5)
  hat, factor = tree_math.scaled_cross_gram(tree, tree)
  np.testing.assert_allclose(hat * (factor / scale) ** 2, expected,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(
      tree_math.gram_matrix({"e": jnp.zeros((3, 0))}), np.zeros((3, 3)))
  summed = tree_math.weighted_task_sum(jnp.array([1.0, 2.0, 3.0]), tree)
  assert summed["e"].shape == (0,) and summed["f"].shape == (2, 0)


def test_zero_size_leaf_through_mgda():
  # MGDA on two tasks g1 = (1, 0), g2 = (0, 1) plus an empty leaf: the
  # min-norm point of the hull is (1/2, 1/2) (weights 1/2, 1/2).
  tx = mo.mgda(2)
  grads = {"a": jnp.eye(2), "e": jnp.zeros((2, 0))}
  params = {"a": jnp.zeros(2), "e": jnp.zeros(0)}
  update, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(update["a"], [0.5, 0.5], rtol=1e-5)
  np.testing.assert_allclose(state.weights, [0.5, 0.5], rtol=1e-5)
  assert update["e"].shape == (0,)


def _wide_tree(num_tasks, num_leaves, seed=3):
  rng = np.random.default_rng(seed)
  shapes = [(2,), (3, 1), (), (5,)] * (num_leaves // 4)
  shapes += [(tree_math._SMALL_LEAF_ELEMENTS + 3,), (2, 0)]
  return [jnp.asarray(rng.normal(size=(num_tasks,) + s), jnp.float32)
          for s in shapes]


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_small_leaves_batched_match_per_leaf(num_tasks):
  # Small leaves go through one concatenated contraction (and one weighted
  # sum, split back); large leaves are contracted alone. The results must be
  # the flattened NumPy ones, leaf by leaf for the sum.
  tree = _wide_tree(num_tasks, 40)
  flat = _flat(tree)
  np.testing.assert_allclose(jax.jit(tree_math.gram_matrix)(tree),
                             flat @ flat.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(tree_math.task_norms(tree),
                             np.linalg.norm(flat, axis=1), rtol=1e-5)
  weights = jnp.linspace(-1.0, 2.0, num_tasks)
  out = jax.jit(tree_math.weighted_task_sum)(weights, tree)
  for got, leaf in zip(out, tree):
    assert got.shape == leaf.shape[1:] and got.dtype == leaf.dtype
    np.testing.assert_allclose(
        got, np.tensordot(np.asarray(weights, np.float64),
                          np.asarray(leaf, np.float64), axes=1),
        rtol=1e-5, atol=1e-5)
