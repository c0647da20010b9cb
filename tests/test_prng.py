"""mtl_optax._src.prng: the same bits as jax.random, in fewer kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtl_optax._src import prng


@pytest.mark.parametrize("num", [2, 10])
def test_split_is_jax_random_split_bit_for_bit(num):
  key = jax.random.PRNGKey(123456789)
  np.testing.assert_array_equal(prng.split(key, num),
                                jax.random.split(key, num))
  keys = jax.vmap(jax.random.PRNGKey)(jnp.array([0, 1, 7, 2**31 - 1]))
  np.testing.assert_array_equal(
      jax.jit(prng.split, static_argnums=1)(keys, num),
      jax.vmap(lambda k: jax.random.split(k, num))(keys))


# 0 and 1 take no round; 2000 items take two rounds and the sort.
@pytest.mark.parametrize("num", [0, 1, 3, 40, 2000])
def test_permutations_are_jax_random_permutation_bit_for_bit(num):
  key = jax.random.PRNGKey(5)
  ours, theirs = prng.permutations(key, num), jax.random.permutation(key, num)
  assert ours.dtype == theirs.dtype
  np.testing.assert_array_equal(ours, theirs)
  # A batch of keys, jitted: each row is its key's permutation.
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(12))
  np.testing.assert_array_equal(
      jax.jit(prng.permutations, static_argnums=1)(keys, num),
      jax.vmap(lambda k: jax.random.permutation(k, num))(keys))


@pytest.mark.parametrize("shape", [(), (3, 4)])
def test_uniform_and_normal_are_jax_random_bit_for_bit(shape):
  key = jax.random.PRNGKey(9)
  pairs = []
  for ours, theirs in ((prng.uniform, jax.random.uniform),
                       (prng.normal, jax.random.normal)):
    pairs.append((ours(key, shape), theirs(key, shape)))
    pairs.append((jax.jit(ours, static_argnums=1)(key, shape),
                  jax.jit(theirs, static_argnums=1)(key, shape)))
  pairs.append((prng.uniform(key, shape, jnp.float32, -2.0, 3.0),
                jax.random.uniform(key, shape, jnp.float32, -2.0, 3.0)))
  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(4))
  pairs.append((jax.jit(prng.normal, static_argnums=1)(keys, shape),
                jax.vmap(lambda k: jax.random.normal(k, shape))(keys)))
  for ours, theirs in pairs:
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)


def test_draws_in_other_dtypes_fall_back_to_jax_random():
  key = jax.random.PRNGKey(1)
  with jax.enable_x64(True):
    for ours, theirs in ((prng.uniform, jax.random.uniform),
                         (prng.normal, jax.random.normal)):
      for dtype in (jnp.float64, jnp.float16):
        a, b = ours(key, (6,), dtype), theirs(key, (6,), dtype)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


def test_ties_among_the_sort_keys_keep_their_order():
  # Equal random words are ranked by position, as the stable sort does.
  words = jnp.array([[5, 3, 5, 3, 9]], jnp.uint32)
  order = prng._stable_order(words)
  np.testing.assert_array_equal(order, [[1, 3, 0, 2, 4]])
  np.testing.assert_array_equal(
      order, [jnp.argsort(words[0], stable=True)])


def test_threefry_matches_the_known_answer_vectors():
  # The Random123 known-answer tests of Threefry-2x32-20 (Salmon et al.).
  cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
            (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3),
            (0xC4923A9C, 0x483DF7A0))]
  for key, count, expected in cases:
    out = prng.threefry2x32(jnp.array(key, jnp.uint32),
                            jnp.array([count[0]], jnp.uint32),
                            jnp.array([count[1]], jnp.uint32))
    assert (int(out[0][0]), int(out[1][0])) == expected


def test_other_schemes_fall_back_to_jax_random():
  typed = jax.random.key(4)
  np.testing.assert_array_equal(
      jax.random.key_data(prng.split(typed, 3)),
      jax.random.key_data(jax.random.split(typed, 3)))
  np.testing.assert_array_equal(prng.permutations(typed, 5),
                                jax.random.permutation(typed, 5))
  typed_batch = jax.random.split(typed, 3)
  np.testing.assert_array_equal(
      prng.normal(typed_batch, (4,)),
      jax.vmap(lambda k: jax.random.normal(k, (4,)))(typed_batch))
  key = jax.random.PRNGKey(4)
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(prng.split(key, 3),
                                  jax.random.split(key, 3))
    np.testing.assert_array_equal(prng.permutations(key, 5),
                                  jax.random.permutation(key, 5))


def test_permutations_under_x64_keep_jax_integer_type():
  with jax.enable_x64(True):
    key = jax.random.PRNGKey(2)
    ours, theirs = prng.permutations(key, 7), jax.random.permutation(key, 7)
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
