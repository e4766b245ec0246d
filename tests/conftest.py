"""Strict JAX for every test: silent broadcasting or dtype promotion is a bug here."""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
