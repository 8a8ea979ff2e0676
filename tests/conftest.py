"""Test-wide settings: strict numpy semantics, so shape bugs fail loudly."""
import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')
