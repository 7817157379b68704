"""kstore_jax: knowledge storage and extraction experiments (Physics of LMs 3.1) in JAX."""

from kstore_jax import heap

__version__ = "0.1.0"

# Before JAX starts its thread pools: reuse freed memory rather than page-fault it in again
# on every step (kstore_jax/heap.py).
RETAINS_FREED_MEMORY = heap.retain_freed_memory()
