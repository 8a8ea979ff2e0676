"""Greedy, beam-search and sampled decoding as jitted, batched functions.

Each runs a fixed number of steps under `lax.scan` over the whole batch; finished
sequences keep emitting <pad>, so there is no per-token Python loop.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

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


def policy_log_prob(logits_BxV, token_B, banned_1xV):
  """log p(token) under the distribution the sampler draws from: the softmax of the logits
  plus `banned_1xV` (NEG at <pad>/<start>, 0 elsewhere)."""
  log_p = jax.nn.log_softmax(logits_BxV.astype(jnp.float32) + banned_1xV, -1)
  return jnp.take_along_axis(log_p, token_B[:, None], -1)[:, 0]


def sample(apply_fn, variables, features, rng, *, num_samples: int, max_len: int,
           end_id: int, pad_id: int = 0, banned_ids=()):
  """(B x K x max_len sampled ids, <pad> after <end>; B x K summed log-probs), in one scan.

  Self-critical training's decode: K captions per image drawn from the model's distribution
  (temperature 1), as K rows per image of one batch. A draw is the argmax of the logits plus
  Gumbel noise (exactly a categorical draw). `banned_ids` (<pad>, <start>: never targets, so
  not words) are never drawn. The log-probs sum each caption's tokens up to and including
  <end> under that restricted distribution; they are differentiable in `variables` and
  `features` (the draws are not), so the gradient of a weighted sum of them is the REINFORCE
  gradient, from this very forward pass (`make_sampler_fn`).

  The noise of step t comes from fold_in(rng, t) over the whole global batch, and JAX's
  partitionable threefry draws the same bits however the batch is sharded, so the samples
  depend only on `rng` and the inputs, not on the number of devices.
  """
  if max_len < 1:
    raise UserError(f'sampling needs max_len >= 1; got {max_len}.')
  carry, logits = apply_fn(variables, features, method='start')
  b, v = logits.shape
  tile = lambda x: jnp.repeat(x, num_samples, axis=0)  # B x ... -> (B * K) x ..., image-major.
  carry, logits = jax.tree.map(tile, carry), tile(logits)
  banned_1xV = jnp.zeros((1, v), jnp.float32).at[:, jnp.asarray(banned_ids, jnp.int32)].set(NEG)

  def pick(logits, done, t):
    noise = jax.random.gumbel(jax.random.fold_in(rng, t), logits.shape, jnp.float32)
    scores = jax.lax.stop_gradient(logits.astype(jnp.float32)) + banned_1xV + noise
    token = jnp.where(done, pad_id, argmax_last(scores)).astype(jnp.int32)
    log_p = jnp.where(done, 0.0, policy_log_prob(logits, token, banned_1xV))
    return token, done | (token == end_id), log_p

  def body(state, t):
    carry, logits, done, total = state
    token, done, log_p = pick(logits, done, t)
    carry, logits = apply_fn(variables, carry, token, method='step')
    return (carry, logits, done, total + log_p), token

  rows = b * num_samples
  init = (carry, logits, jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.float32))
  # max_len - 1 decoder steps, as in greedy: the last token needs only the last logits.
  (_, logits, done, total), tokens_TxR = jax.lax.scan(body, init, jnp.arange(max_len - 1))
  last_R, _, log_p = pick(logits, done, max_len - 1)
  tokens = jnp.concatenate([tokens_TxR.T, last_R[:, None]], axis=1)
  return tokens.reshape(b, num_samples, max_len), (total + log_p).reshape(b, num_samples)


class Draws(NamedTuple):
  """What `make_sampler_fn`'s function returns (a pytree, so it crosses jit boundaries)."""
  samples: jax.Array    # B x K x T sampled ids, <pad> after <end>.
  greedy: jax.Array     # B x T greedy ids.
  log_probs: jax.Array  # B x K summed log-probs of the samples.
  # d(params) of sum(cotangent_BxK * log_probs): a `jax.vjp` pullback holding the forward's
  # residuals, so the gradient step needs no second forward pass.
  pullback: Callable


def make_sampler_fn(model, *, num_samples: int, max_len: int, end_id: int, banned_ids=(),
                    from_features: bool = False, train_encoder: bool = True):
  """jit(variables, images or cached features, rng) -> `Draws`: K samples per image with
  their log-probs and the pullback of those log-probs to variables['params'], and the greedy
  captions (the 'greedy' baseline's, and the logged greedy reward), encoding once.

  The model runs in inference mode (no dropout, BatchNorm's running statistics), so the
  log-probs are exactly those of the policy that drew the samples. Differentiating the
  sampling scan itself, instead of a teacher-forced pass over the samples afterwards, saves
  that pass: the photo default's SCST step (sampler + gradient) took 2.0 s instead of 2.5-3.4 s
  on a 2-core AVX2 EPYC (docs/performance.md).

  With `train_encoder=False` the images are encoded with the params as given, not the
  differentiated ones: the pullback gives the encoder a zero gradient and the backward pass
  never runs through it.
  """

  @jax.jit
  def run(variables, inputs, rng):
    rest = {k: v for k, v in variables.items() if k != 'params'}
    encode = lambda v: inputs if from_features else model.apply(v, inputs, method='encode')

    def policy(params):
      v = {'params': params, **rest}
      features = encode(v if train_encoder else variables)
      samples, log_probs = sample(model.apply, v, features, rng, num_samples=num_samples,
                                  max_len=max_len, end_id=end_id, banned_ids=banned_ids)
      return log_probs, (samples, features)

    log_probs, pullback, (samples, features) = jax.vjp(policy, variables['params'],
                                                       has_aux=True)
    greedy_ids = greedy(model.apply, variables, features, max_len=max_len,
                        end_id=end_id)
    return Draws(samples, greedy_ids, log_probs, pullback)

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
