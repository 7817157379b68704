"""Counter-based randomness: a pure, vectorised hash of integer keys (splitmix64 finaliser).

Every random choice in rendering is `hash(seed, purpose, person, copy, slot) % n`, so any
bio can be rendered alone, in any order, in any process, and always comes out the same.
"""

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  x = x ^ (x >> np.uint64(30))
  x = x * _M1
  x = x ^ (x >> np.uint64(27))
  x = x * _M2
  return x ^ (x >> np.uint64(31))


def hash_keys(*keys) -> np.ndarray:
  """Combine integer keys (scalars or broadcastable arrays) into uniform uint64 values."""
  with np.errstate(over="ignore"):
    h = np.uint64(0x243F6A8885A308D3)
    for k in keys:
      k = np.asarray(k).astype(np.uint64)
      h = _mix(h ^ (k + _GOLDEN + (h << np.uint64(6)) + (h >> np.uint64(2))))
    return h


def uniform_int(n: int, *keys) -> np.ndarray:
  """Hash keys to integers in [0, n)."""
  return (hash_keys(*keys) % np.uint64(n)).astype(np.int64)
