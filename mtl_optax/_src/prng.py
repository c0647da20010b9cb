"""The methods' small random draws as straight-line code: key splits,
task-order permutations, uniform and normal numbers.

PCGrad, GradVac and CAGrad-Fast draw a few keys and permutations of K items
per step, GradDrop a key per leaf and their uniform draws, MARIGOLD and
random weighting a few normal numbers. JAX lowers each Threefry-2x32 call
on a CPU as a rolled loop of its rounds, about a dozen kernels to compile
per ``jax.random.split`` (PCGrad's splits and orders for K = 3, compiled
alone: 0.43 s through ``jax.random``, 0.33 s here). The functions here give
the same bits as ``jax.random``: the Threefry-2x32 hash (Salmon, Moraes,
Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC 2011) of the
counters of JAX's partitionable scheme (the default), written out round by
round in ``uint32`` arithmetic, which XLA fuses into the kernel that uses
it. Each such kernel recomputes the hash for itself, so these draws are for
values with few consumers (keys, task orders, a draw read by one kernel); a
draw that feeds every leaf of a wide tree compiles faster through
``jax.random``. Where JAX draws differently (the legacy non-partitionable
scheme, another PRNG implementation, typed keys, dtypes other than float32)
they call ``jax.random`` itself. Either way a seed gives the same stream as
``jax.random``, which the tests check bit for bit.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mtl_optax._src import eager

# Threefry-2x32's rotation constants (eight rounds, repeated) and key-schedule
# parity constant, as specified by Salmon et al. (2011), Table 4 and Sec. 3.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
# Permutations of up to this many items rank by pairwise comparisons (an
# n x n elementwise kernel); longer ones sort.
_RANKED_PERMUTATION_MAX = 128


def _is_own_scheme(key: jax.Array) -> bool:
  """Whether ``key`` is a raw Threefry key drawn by the partitionable
  scheme, the one this module reproduces."""
  key = jnp.asarray(key)
  return (bool(jax.config.jax_threefry_partitionable)
          and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
          and key.dtype == jnp.uint32 and key.ndim >= 1
          and key.shape[-1] == 2
          and jax.config.jax_default_prng_impl == "threefry2x32")


def _rotate_left(value: jax.Array, bits: int) -> jax.Array:
  return jax.lax.shift_left(value, np.uint32(bits)) | (
      jax.lax.shift_right_logical(value, np.uint32(32 - bits)))


def threefry2x32(key: jax.Array, high: jax.Array, low: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds of the counters ``(high, low)`` under
  each key of ``key`` (``(..., 2)`` uint32): ``(..., *counters.shape)``."""
  k0 = key[..., 0].reshape(key.shape[:-1] + (1,) * high.ndim)
  k1 = key[..., 1].reshape(k0.shape)
  schedule = (k0, k1, k0 ^ k1 ^ np.uint32(_PARITY))
  x0, x1 = high + k0, low + k1
  for group in range(5):
    for bits in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, bits) ^ x0
    # Key injection after every four rounds.
    x0 = x0 + schedule[(group + 1) % 3]
    x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def _hashed_counters(key: jax.Array, shape: tuple[int, ...]):
  """The hash of the counters ``0 .. prod(shape) - 1`` laid out in
  ``shape`` (as 64-bit numbers: high and low words), one set per key."""
  size = math.prod(shape)
  if size >= 2 ** 32:
    raise NotImplementedError("draws of 2**32 or more values per key")
  low = jnp.arange(size, dtype=jnp.uint32).reshape(shape)
  return threefry2x32(key, jnp.zeros_like(low), low)


def split(key: jax.Array, num: int = 2) -> jax.Array:
  """``jax.random.split(key, num)``: ``(num, 2)`` new keys (for a key of
  shape ``(..., 2)``, ``(..., num, 2)``, one split per key)."""
  return _draw(key, lambda k: _split(k, num),
               lambda k: jax.random.split(k, num))


# The draws are compiled when called eagerly, as JAX's are: one dispatch of a
# compiled kernel, not one per round of the hash.
@eager.compiled_when_eager
def _split(key, num):
  return jnp.stack(_hashed_counters(key, (num,)), axis=-1)


def _random_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """32 random bits per entry of ``shape``, per key: the partitionable
  scheme's ``jax.random.bits(key, shape)``."""
  high, low = _hashed_counters(key, shape)
  return high ^ low


def _draw(key, own, theirs, own_applies: bool = True):
  """``own(key)`` where this module reproduces JAX's scheme for ``key`` (and
  ``own_applies``), else ``theirs`` (a ``jax.random`` draw of one key)
  mapped over the batch axes of ``key``: all of a typed key array's, all but
  the last of a raw one's."""
  key = jnp.asarray(key)
  if own_applies and _is_own_scheme(key):
    return own(key)
  typed = jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  for _ in range(key.ndim - (0 if typed else 1)):
    theirs = jax.vmap(theirs)
  return theirs(key)


def uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32,
            minval: float = 0.0, maxval: float = 1.0) -> jax.Array:
  """``jax.random.uniform(key, shape, dtype, minval, maxval)`` (for keys of
  shape ``(..., 2)``, ``(..., *shape)``, one draw per key).

  JAX's construction for float32: 23 random bits as the mantissa of a
  number in ``[1, 2)``, minus one, scaled to the interval and clipped below
  at ``minval``. Other dtypes draw through ``jax.random``.
  """
  shape = tuple(shape)
  return _draw(key, lambda k: _uniform_float32(k, shape, minval, maxval),
               lambda k: jax.random.uniform(k, shape, dtype, minval, maxval),
               jnp.dtype(dtype) == jnp.float32)


# Compiled also so that, eagerly too, the scaling's multiply and add are
# compiled (and contracted) as JAX compiles its own, to the same bits.
@eager.compiled_when_eager
def _uniform_float32(key, shape, minval, maxval):
  mantissa = jax.lax.shift_right_logical(_random_bits(key, shape),
                                         np.uint32(32 - 23))
  one = np.array(1.0, np.float32).view(np.uint32)
  floats = jax.lax.bitcast_convert_type(mantissa | one, jnp.float32) - 1.0
  low = jnp.asarray(minval, jnp.float32)
  high = jnp.asarray(maxval, jnp.float32)
  return jnp.maximum(low, floats * (high - low) + low)


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32
           ) -> jax.Array:
  """``jax.random.normal(key, shape, dtype)`` for float32 (per key of
  ``(..., 2)``): ``sqrt(2) erfinv(u)``, ``u`` uniform on ``(-1, 1)``."""
  shape = tuple(shape)
  return _draw(key, lambda k: _normal_float32(k, shape),
               lambda k: jax.random.normal(k, shape, dtype),
               jnp.dtype(dtype) == jnp.float32)


@eager.compiled_when_eager
def _normal_float32(key, shape):
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  u = _uniform_float32(key, shape, low, np.float32(1.0))
  return np.float32(np.sqrt(2)) * jax.lax.erf_inv(u)


def _stable_order(sort_keys: jax.Array) -> jax.Array:
  """The stable ascending order of ``(..., n)`` uint32 keys: ``order[j]``
  is the position of the entry of rank ``j`` (ties by position)."""
  num = sort_keys.shape[-1]
  if num > _RANKED_PERMUTATION_MAX:
    positions = jnp.broadcast_to(jnp.arange(num), sort_keys.shape)
    return jax.lax.sort_key_val(sort_keys, positions, is_stable=True)[1]
  mine, other = sort_keys[..., :, None], sort_keys[..., None, :]
  earlier = np.arange(num)[None, :] < np.arange(num)[:, None]
  rank = jnp.sum((other < mine) | ((other == mine) & earlier), axis=-1)
  picks = rank[..., None, :] == np.arange(num)[:, None]
  return jnp.sum(jnp.where(picks, np.arange(num), 0), axis=-1)


def permutations(keys: jax.Array, num: int) -> jax.Array:
  """``jax.random.permutation(key, num)`` for each key of ``keys``
  (``(..., 2)``): ``(..., num)`` orders of ``0 .. num - 1``, in JAX's
  default integer type.

  JAX's algorithm: a few rounds (one below about 1600 items) of sorting by
  fresh random 32-bit keys, stably; the rounds' count and keys are the same
  here, and the sort is a ranking by comparisons for short permutations.
  """
  return _draw(keys, lambda k: _permutations(k, num),
               lambda k: jax.random.permutation(k, num))


@eager.compiled_when_eager
def _permutations(keys, num):
  # JAX's round count: enough that all n sort keys are distinct in at least
  # one round with high probability.
  rounds = int(np.ceil(3 * np.log(max(1, num))
                       / np.log(np.iinfo(np.uint32).max)))
  order = jnp.broadcast_to(jnp.arange(num), keys.shape[:-1] + (num,))
  for round_ in range(rounds):
    pair = split(keys)
    keys, sub = pair[..., 0, :], pair[..., 1, :]
    picked = _stable_order(_random_bits(sub, (num,))).astype(order.dtype)
    # The first round permutes 0 .. n - 1: its order is the permutation.
    order = picked if round_ == 0 else jnp.take_along_axis(order, picked,
                                                           axis=-1)
  return order
