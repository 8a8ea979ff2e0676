"""The train steps' metric helpers against the reference ops they replace for speed."""
import jax
import jax.numpy as jnp
import numpy as np

from capjax.caption import steps


def test_top1_correct_equals_argmax_where_no_logits_tie():
  logits = jax.random.normal(jax.random.key(0), (6, 9, 50))
  targets = jax.random.randint(jax.random.key(1), (6, 9), 0, 50)
  targets = targets.at[:, :3].set(jnp.argmax(logits[:, :3], -1))  # Some right, most wrong.
  got = steps.top1_correct(logits, targets)
  np.testing.assert_array_equal(got, jnp.argmax(logits, -1) == targets)
  assert 18 <= int(got.sum()) < got.size


def test_top1_correct_counts_a_tied_maximum_as_correct():
  logits = jnp.array([[[1.0, 3.0, 3.0, 0.0]]])
  assert steps.top1_correct(logits, jnp.array([[2]])).item()  # argmax says 1.
  assert not steps.top1_correct(logits, jnp.array([[3]])).item()


def test_masked_token_stats_accuracy_skips_pads():
  logits = jnp.eye(4)[None] * 5.0  # Token t's logits peak at t.
  targets = jnp.array([[0, 1, 3, 3]])  # <pad>, right, wrong, right.
  _, correct, count = steps.masked_token_stats(logits, targets)
  assert (float(correct), float(count)) == (2.0, 3.0)

