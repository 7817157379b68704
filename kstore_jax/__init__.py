"""kstore_jax: knowledge storage and extraction experiments (Physics of LMs 3.1) in JAX."""

__version__ = "0.1.0"
