"""Greedy, beam-search and sampled decoding as jitted, batched functions.

Each runs a fixed number of steps under `lax.scan` over the whole batch; finished
sequences keep emitting <pad>, so there is no per-token Python loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from capjax.errors import UserError

NEG = -1e9  # "Impossible" score; finite so that sums never produce NaN.


def argmax_last(x):
  """`jnp.argmax(x, -1)` (the first index of the maximum) as a max and a min over the last axis.

  XLA:CPU's argmax is a variadic reduce that does not vectorise: 3.1 ms for 256 x 5000 logits,
  against 1.1 ms for this, and greedy decoding takes one per step (2-core EPYC, jax 0.10.2).
  Unlike argmax, a row holding NaN gives the last index (NaN equals no maximum).
  """
  last = x.shape[-1] - 1
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == x.max(-1, keepdims=True), iota, last), -1)


def greedy(apply_fn, variables, features, *, max_len: int, end_id: int, pad_id: int = 0):
  """B x max_len token ids: argmax at every step, <pad> after <end>."""
  if max_len < 1:
    raise UserError(f'greedy decoding needs max_len >= 1; got {max_len}.')
  carry, logits = apply_fn(variables, features, method='start')

  def pick(logits, done):
    token = jnp.where(done, pad_id, argmax_last(logits)).astype(jnp.int32)
    return token, done | (token == end_id)

  def body(state, _):
    carry, logits, done = state
    token, done = pick(logits, done)
    carry, logits = apply_fn(variables, carry, token, method='step')
    return (carry, logits, done), token

  done0 = jnp.zeros(logits.shape[:1], bool)
  # max_len - 1 decoder steps: the last token needs only the logits already computed.
  (_, logits, done), tokens_TxB = jax.lax.scan(body, (carry, logits, done0), None,
                                               length=max_len - 1)
  last_B, _ = pick(logits, done)
  return jnp.concatenate([tokens_TxB.T, last_B[:, None]], axis=1)


def length_penalty(length, alpha: float):
  """GNMT's ((5 + length) / 6) ** alpha; alpha=0 ranks by total log-probability."""
  return ((5.0 + length) / 6.0) ** alpha


def beam_search(apply_fn, variables, features, *, beam_size: int, max_len: int,
                end_id: int, pad_id: int = 0, alpha: float = 0.6):
  """B x max_len token ids of the best beam after length normalisation."""
  if max_len < 1:
    raise UserError(f'beam search needs max_len >= 1; got {max_len}.')
  k = beam_size
  carry, logits = apply_fn(variables, features, method='start')
  b, v = logits.shape
  tile = lambda x: jnp.repeat(x, k, axis=0)  # B x ... -> (B*K) x ...
  carry, logits = jax.tree.map(tile, carry), tile(logits)
  # Only beam 0 is live at the start, so the first step picks K distinct words.
  scores = jnp.tile(jnp.array([0.0] + [NEG] * (k - 1)), (b, 1))
  pad_row = jnp.full((v,), NEG).at[pad_id].set(0.0)

  def extend(carry, logits, seqs, scores, done, lengths, t):
    """The K best continuations by token t; the carry follows the beams they extend."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, v)
    logp = jnp.where(done[..., None], pad_row, logp)  # Finished beams only pad, for free.
    cand = (scores[..., None] + logp).reshape(b, k * v)
    scores, flat = jax.lax.top_k(cand, k)
    beam, token = flat // v, (flat % v).astype(jnp.int32)
    pick = lambda x: jnp.take_along_axis(x, beam.reshape(b, k, *([1] * (x.ndim - 2))), 1)
    was_done = pick(done)
    seqs = pick(seqs).at[:, :, t].set(token)
    lengths = pick(lengths) + (~was_done).astype(jnp.int32)
    done = was_done | (token == end_id)
    rows = (jnp.arange(b)[:, None] * k + beam).reshape(-1)
    carry = jax.tree.map(lambda x: x[rows], carry)
    return carry, token, seqs, scores, done, lengths

  def body(state, t):
    carry, token, *beams = extend(*state, t)
    carry, logits = apply_fn(variables, carry, token.reshape(-1), method='step')
    return (carry, logits, *beams), None

  init = (carry, logits, jnp.full((b, k, max_len), pad_id, jnp.int32), scores,
          jnp.zeros((b, k), bool), jnp.zeros((b, k), jnp.int32))
  # max_len - 1 decoder steps, as in greedy: the last token needs only the last logits.
  state, _ = jax.lax.scan(body, init, jnp.arange(max_len - 1))
  _, _, seqs, scores, _, lengths = extend(*state, max_len - 1)
  best = jnp.argmax(scores / length_penalty(lengths.astype(jnp.float32), alpha), -1)
  return jnp.take_along_axis(seqs, best[:, None, None], 1)[:, 0]


def sample_with_greedy(apply_fn, variables, features, rng, *, num_samples: int, max_len: int,
                       end_id: int, pad_id: int = 0, banned_ids=()):
  """(B x K x max_len sampled ids, B x max_len greedy ids), <pad> after <end>, in one scan.

  Self-critical training's decode: K captions per image drawn from the model's distribution
  (temperature 1) and the greedy one, as K + 1 rows per image of one batch. A draw is the
  argmax of the logits plus Gumbel noise (exactly a categorical draw), so sampled and greedy
  rows share one argmax; the greedy rows get no noise and equal `greedy`. `banned_ids`
  (<pad>, <start>: never targets, so not words) are never sampled; `policy_log_probs` in
  steps.py scores the samples under the same restricted distribution.

  The noise of step t comes from fold_in(rng, t) over the whole global batch, and JAX's
  partitionable threefry draws the same bits however the batch is sharded, so the samples
  depend only on `rng` and the inputs, not on the number of devices.
  """
  if max_len < 1:
    raise UserError(f'sampling needs max_len >= 1; got {max_len}.')
  rows = num_samples + 1
  carry, logits = apply_fn(variables, features, method='start')
  b, v = logits.shape
  tile = lambda x: jnp.repeat(x, rows, axis=0)  # B x ... -> (B * (K + 1)) x ..., image-major.
  carry, logits = jax.tree.map(tile, carry), tile(logits)
  sampled_row = jnp.tile(jnp.arange(rows) < num_samples, b)[:, None]
  banned_1xV = jnp.zeros((1, v), jnp.float32).at[:, jnp.asarray(banned_ids, jnp.int32)].set(NEG)

  def pick(logits, done, t):
    logits = logits.astype(jnp.float32)
    noise = jax.random.gumbel(jax.random.fold_in(rng, t), logits.shape, jnp.float32)
    scores = jnp.where(sampled_row, logits + banned_1xV + noise, logits)
    token = jnp.where(done, pad_id, argmax_last(scores)).astype(jnp.int32)
    return token, done | (token == end_id)

  def body(state, t):
    carry, logits, done = state
    token, done = pick(logits, done, t)
    carry, logits = apply_fn(variables, carry, token, method='step')
    return (carry, logits, done), token

  done0 = jnp.zeros(logits.shape[:1], bool)
  # max_len - 1 decoder steps, as in greedy: the last token needs only the last logits.
  (_, logits, done), tokens_TxR = jax.lax.scan(body, (carry, logits, done0),
                                               jnp.arange(max_len - 1))
  last_R, _ = pick(logits, done, max_len - 1)
  tokens = jnp.concatenate([tokens_TxR.T, last_R[:, None]], axis=1).reshape(b, rows, max_len)
  return tokens[:, :num_samples], tokens[:, num_samples]


def make_sampler_fn(model, *, num_samples: int, max_len: int, end_id: int, banned_ids=(),
                    from_features: bool = False):
  """jit(variables, images or cached features, rng) -> `sample_with_greedy`'s (samples,
  greedy), encoding and decoding in one program. The model runs in inference mode."""

  @jax.jit
  def run(variables, inputs, rng):
    features = inputs if from_features else model.apply(variables, inputs, method='encode')
    return sample_with_greedy(model.apply, variables, features, rng, num_samples=num_samples,
                              max_len=max_len, end_id=end_id, banned_ids=banned_ids)

  return run


def make_captioner_fn(model, *, method: str, max_len: int, end_id: int,
                      beam_size: int = 1, alpha: float = 0.6, from_features: bool = False):
  """jit(variables, images) -> B x max_len ids, encoding and decoding in one program; with
  `from_features`, jit(variables, encoder features), for features from the cache.

  `method` is 'greedy' or 'beam' (config.eval.decoding, checked with the config).
  """

  @jax.jit
  def run(variables, inputs):
    features = inputs if from_features else model.apply(variables, inputs, method='encode')
    if method == 'greedy':
      return greedy(model.apply, variables, features, max_len=max_len, end_id=end_id)
    return beam_search(model.apply, variables, features, beam_size=beam_size,
                       max_len=max_len, end_id=end_id, alpha=alpha)

  return run
