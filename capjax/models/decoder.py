"""LSTM caption decoders: init-/par-inject (Show and Tell), merge, and Show-Attend-Tell.

Training runs the whole sequence with teacher forcing in one scan; decoding calls the very
same LSTM one step at a time (`start` + `step`), so greedy and beam search share the trained
weights without any reshaping. Inject and merge use `capjax.models.lstm.LSTM` (OptimizedLSTMCell's
maths with the input projection hoisted out of the scan and a hand-written backward pass: 1.4x
faster forward + backward at the benchmark's 64 x 20 x 512 on the 2-core CPU); attention's LSTM
input depends on each step's context, so it keeps flax's cell inside its scan.

`dtype` is the compute dtype (`model.dtype`): params are float32 whatever it is; embeddings,
matmuls and activations run in it; the LSTM cell state c stays float32 (see capjax.models.lstm);
the word logits leave every decoder as float32, so the loss, the log-softmax of beam search and
the attention softmax are float32.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from capjax.models import lstm


class _Decoder(nn.Module):
  """What every decoder has: the vocabulary, word embedding, LSTM width, dropout, the optional
  LayerNorm of the image features, and the word classifier 'out' (float32 logits)."""
  vocab_size: int
  embed_dim: int = 128
  hidden: int = 256
  dropout: float = 0.0
  feature_norm: bool = False  # LayerNorm the image features (see _feature_ln).
  dtype: Any = jnp.float32

  def _shared_setup(self):
    self.feature_ln = _feature_ln(self.feature_norm, self.dtype)
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name='embed')
    self.drop = nn.Dropout(self.dropout)
    # The vocabulary projection is most of a captioning step's matmul work (61% of its FLOPs at
    # the benchmark's shapes), so it runs in the compute dtype like every other matmul.
    self.out = nn.Dense(self.vocab_size, dtype=self.dtype, name='out')

  def _word_logits(self, x):
    """'out' then float32: whatever the compute dtype, the softmax and the loss are float32."""
    return self.out(x).astype(jnp.float32)

  def _initial_state(self):
    """The Dense layers that map the image to the LSTM's initial (h, c)."""
    self.init_h = nn.Dense(self.hidden, dtype=self.dtype, name='init_h')
    self.init_c = nn.Dense(self.hidden, dtype=self.dtype, name='init_c')


class InjectDecoder(_Decoder):
  """Image feature -> LSTM initial state *and* step-0 input; words after that.

  `features` is the encoder's grid B x h x w x C (or B x C pooled). The grid is
  flattened, not averaged: which object is left of which lives in the positions.
  """
  pool: str = 'flatten'  # 'flatten' keeps layout; 'mean' for big pretrained grids.
  every_step: bool = False  # Also feed the image embedding with every word ("par-inject").

  def setup(self):
    self._shared_setup()
    self._initial_state()
    self.image_proj = nn.Dense(self.embed_dim, dtype=self.dtype, name='image_proj')
    self.lstm = lstm.LSTM(self.hidden, dtype=self.dtype, name='lstm')

  def _image(self, features):
    b = features.shape[0]
    if self.pool == 'flatten':
      flat = self.feature_ln(features).reshape(b, -1)
    else:
      flat = self.feature_ln(_pool(features))
    v_BxE = nn.relu(self.image_proj(flat))
    carry = (jnp.tanh(self.init_c(v_BxE)), jnp.tanh(self.init_h(v_BxE)))
    return carry, v_BxE

  def __call__(self, features, tokens_BxL, train: bool = False):
    """Logits B x (L-1) x V for predicting tokens[:, 1:] (teacher forcing).

    Position 0 sees the image (in place of <start>); position t sees word t.
    """
    carry, v_BxE = self._image(features)
    words_BxTxE = self.embed(tokens_BxL[:, 1:-1])
    xs = jnp.concatenate([v_BxE[:, None, :].astype(words_BxTxE.dtype), words_BxTxE], 1)
    if self.every_step:
      xs = jnp.concatenate([xs, jnp.broadcast_to(v_BxE[:, None, :], xs.shape)], -1)
    xs = self.drop(xs, deterministic=not train)
    _, hs_BxTxH = self.lstm(carry, xs)
    return self._word_logits(self.drop(hs_BxTxH, deterministic=not train))

  def start(self, features):
    """(carry, logits of the first word) from the image alone."""
    carry, v_BxE = self._image(features)
    x = jnp.concatenate([v_BxE, v_BxE], -1) if self.every_step else v_BxE
    carry, h = self.lstm.step(carry, x)
    return (carry, v_BxE), self._word_logits(h)

  def step(self, state, token_B):
    """(state, logits of the next word) after feeding `token_B`."""
    carry, v_BxE = state
    x = self.embed(token_B)
    if self.every_step:
      x = jnp.concatenate([x, v_BxE.astype(x.dtype)], -1)
    carry, h = self.lstm.step(carry, x)
    return (carry, v_BxE), self._word_logits(h)


def _feature_ln(enabled: bool, dtype):
  """LayerNorm over channels, or identity.

  Features of a frozen encoder come at whatever scale it has: a random-init ResNet50 (its
  BatchNorm statistics still 0/1) gives values in the hundreds, which saturate the LSTM's init
  and blow up the first logits. Normalising each position's channels puts any encoder on the
  scale of the word embeddings. Mean-pooling decoders normalise after pooling, so a cache of
  pooled features and the full grid at predict time give the same input.
  """
  return nn.LayerNorm(dtype=dtype) if enabled else (lambda x: x)


def _pool(features):
  """B x C from a grid B x h x w x C (mean over positions) or from already pooled B x C."""
  return features.reshape(features.shape[0], -1, features.shape[-1]).mean(1)


class MergeDecoder(_Decoder):
  """The "merge" architecture of the Keras seed (Tanti et al., 2018): the LSTM reads only words;
  the image vector joins the LSTM's output (added, or concatenated) before the word classifier.

  Because the image never enters the recurrence, the LSTM is a pure language model and the image
  only re-weights its next-word guesses; the pooled (mean) feature is all it needs, so a frozen
  encoder's cache can store 2048-d vectors instead of grids.
  """
  merge: str = 'add'  # 'add' (the Keras seed) or 'concat'.

  def setup(self):
    self._shared_setup()
    if self.merge not in ('add', 'concat'):
      raise ValueError(f"merge={self.merge!r} must be 'add' or 'concat'")
    self.image_proj = nn.Dense(self.hidden, dtype=self.dtype, name='image_proj')
    self.lstm = lstm.LSTM(self.hidden, dtype=self.dtype, name='lstm')
    self.mix = nn.Dense(self.hidden, dtype=self.dtype, name='mix')

  def _image(self, features, train: bool):
    pooled = self.drop(self.feature_ln(_pool(features)), deterministic=not train)
    return nn.relu(self.image_proj(pooled))

  def _logits(self, h, v, train: bool):
    v = v.astype(h.dtype)
    merged = h + v if self.merge == 'add' else jnp.concatenate([h, v], -1)
    return self._word_logits(self.drop(nn.relu(self.mix(merged)), deterministic=not train))

  def _zero_carry(self, batch: int):
    zeros = jnp.zeros((batch, self.hidden), self.dtype)
    return zeros, zeros

  def __call__(self, features, tokens_BxL, train: bool = False):
    """Logits B x (L-1) x V for tokens[:, 1:], reading tokens[:, :-1] (from <start>)."""
    v_BxH = self._image(features, train)
    xs = self.drop(self.embed(tokens_BxL[:, :-1]), deterministic=not train)
    _, hs_BxTxH = self.lstm(self._zero_carry(tokens_BxL.shape[0]), xs)
    v_Bx1xH = v_BxH[:, None, :]
    return self._logits(hs_BxTxH, jnp.broadcast_to(v_Bx1xH, hs_BxTxH.shape[:2] + v_BxH.shape[-1:]),
                        train)

  def start(self, features):
    """(state, logits of the first word): the LSTM reads <start> (id 1) from a zero state."""
    v_BxH = self._image(features, False)
    start_B = jnp.full(features.shape[:1], 1, jnp.int32)
    return self.step((self._zero_carry(features.shape[0]), v_BxH), start_B)

  def step(self, state, token_B):
    """(state, logits of the next word) after feeding `token_B`."""
    carry, v_BxH = state
    carry, h = self.lstm.step(carry, self.embed(token_B))
    return (carry, v_BxH), self._logits(h, v_BxH, False)


def grid_position_features(h: int, w: int, frequencies: int = 4) -> jnp.ndarray:
  """(h*w) x (8*frequencies) sin/cos of each cell's (x, y) centre in [-1, 1].

  Convolutions are translation invariant, so without these the attention could not
  tell "the object on the left" from "the object on the right".
  """
  ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h * 2 - 1, (jnp.arange(w) + 0.5) / w * 2 - 1,
                        indexing='ij')
  scales = (jnp.pi * 2.0 ** jnp.arange(frequencies) / 2)[None, :]  # 1 x F: same rank as N x 1.
  angles = jnp.concatenate([xs.reshape(-1, 1) * scales, ys.reshape(-1, 1) * scales], -1)
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], -1)


def _float32(fn):
  """`fn` applied to its input cast to float32."""
  return lambda x: fn(x.astype(jnp.float32))


class AttendStep(nn.Module):
  """One decoder step with soft attention over the grid.

  `query` says which state attends:
  * 'previous' (Show, Attend and Tell): the state *before* reading this step's word picks the
    cells; the LSTM then reads the word and that context.
  * 'current' (Luong et al., 2015): the LSTM first reads the word (and, "input feeding", the
    last step's context), then its new state picks the cells. The word just emitted steers
    where the model looks for the next one: after "a small green", attention can go to the
    green object for its shape. With 'previous' that context was chosen before "green" was
    read, so when two objects could come first it blends both and the caption mixes them
    (one's colour with the other's shape).

  The carry is ((c, h), coverage, fed_context). `coverage` B x N sums the attention each cell
  has had so far (None when `coverage` is off). With it on, the score of cell n gains
  s(h) * coverage_n, s a learned function of the state that starts at 0 (See et al., 2017): the
  model can look for "the object I have not described yet". `fed_context` is the last
  context for 'current' (None for 'previous').
  """
  hidden: int
  attn_dim: int
  score: str = 'additive'
  coverage: bool = False
  query: str = 'previous'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, x_BxE, keys_BxNxA, values_BxNxD):
    (c, h), coverage_BxN, fed_BxD = carry
    # Gates and c in float32, from the cell's bf16 matmuls under bf16 compute (as in
    # capjax.models.lstm, whose docstring says why).
    lstm = nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype, gate_fn=_float32(jax.nn.sigmoid),
                                activation_fn=_float32(jnp.tanh), name='lstm')
    if self.query == 'current':
      (c, h), _ = lstm((c, h), jnp.concatenate([x_BxE, fed_BxD.astype(x_BxE.dtype)], -1))
      h = h.astype(self.dtype)  # o * tanh(c) is float32; h feeds matmuls, in the compute dtype.
      alpha_BxN, context = self._attend(h, coverage_BxN, keys_BxNxA, values_BxNxD)
      fed_BxD = context
    else:
      alpha_BxN, context = self._attend(h, coverage_BxN, keys_BxNxA, values_BxNxD)
      # The gate lets the model say "no image needed here" (articles, relations).
      gate = nn.sigmoid(nn.Dense(1, dtype=self.dtype, name='gate')(h))
      (c, h), _ = lstm((c, h), jnp.concatenate([x_BxE, gate * context], -1))
      h = h.astype(self.dtype)
    if self.coverage:
      coverage_BxN = coverage_BxN + alpha_BxN
    return ((c, h), coverage_BxN, fed_BxD), (jnp.concatenate([h, context], -1), alpha_BxN)

  def _attend(self, h, coverage_BxN, keys_BxNxA, values_BxNxD):
    """(attention B x N, context B x D) for state `h`."""
    query = nn.Dense(self.attn_dim, dtype=self.dtype, name='query')(h)
    if self.score == 'dot':  # Luong: one B x N contraction per step, cheap on a CPU.
      energy = jnp.einsum('bna,ba->bn', keys_BxNxA, query) / jnp.sqrt(self.attn_dim)
    else:  # Bahdanau: an attn_dim-wide tanh layer over every cell, every step.
      energy = nn.Dense(1, dtype=self.dtype, name='energy')(
          jnp.tanh(keys_BxNxA + query[:, None, :]))[..., 0]
    if self.coverage:
      scale_Bx1 = nn.Dense(1, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                           name='coverage_scale')(h)
      energy = energy + scale_Bx1 * coverage_BxN.astype(energy.dtype)
    alpha_BxN = jax.nn.softmax(energy.astype(jnp.float32), -1)
    context = jnp.einsum('bn,bnd->bd', alpha_BxN.astype(values_BxNxD.dtype), values_BxNxD)
    return alpha_BxN, context


class AttentionDecoder(_Decoder):
  """Show, Attend and Tell over the encoder's h x w grid.

  Attention weights of every step are kept with `sow('intermediates', 'attention')`
  so that the doubly stochastic regulariser and the attention plots can read them.
  """
  attn_dim: int = 128
  score: str = 'additive'  # 'additive' (Bahdanau, as in the paper) or 'dot' (Luong).
  coverage: bool = False  # Scores also see each cell's attention so far (see AttendStep).
  query: str = 'previous'  # Which state attends: 'previous' (the paper) or 'current' (Luong).

  def setup(self):
    self._shared_setup()
    self._initial_state()
    self.keys = nn.Dense(self.attn_dim, dtype=self.dtype, name='keys')
    self.values = nn.Dense(self.hidden, dtype=self.dtype, name='values')
    if self.query not in ('previous', 'current'):
      raise ValueError(f"query={self.query!r} must be 'previous' or 'current'")
    self.cell = AttendStep(self.hidden, self.attn_dim, self.score, self.coverage, self.query,
                           self.dtype, name='attend')

  def _memory(self, features):
    b, c = features.shape[0], features.shape[-1]
    grid_BxNxC = self.feature_ln(features.reshape(b, -1, c))
    mean = grid_BxNxC.mean(1)
    # c is float32 under any compute dtype, as AttendStep's float32 gates return it.
    lstm_carry = (jnp.tanh(self.init_c(mean)).astype(jnp.float32), jnp.tanh(self.init_h(mean)))
    coverage = jnp.zeros(grid_BxNxC.shape[:2], jnp.float32) if self.coverage else None
    fed = jnp.zeros((b, self.hidden), self.dtype) if self.query == 'current' else None
    carry = (lstm_carry, coverage, fed)
    if features.ndim == 4:  # A grid: tell keys and values where each cell is.
      pos_NxP = grid_position_features(*features.shape[1:3]).astype(grid_BxNxC.dtype)
      grid_BxNxC = jnp.concatenate(
          [grid_BxNxC, jnp.broadcast_to(pos_NxP, (b,) + pos_NxP.shape)], -1)
    return carry, self.keys(grid_BxNxC), self.values(grid_BxNxC)

  def __call__(self, features, tokens_BxL, train: bool = False):
    """Logits B x (L-1) x V for tokens[:, 1:], reading tokens[:, :-1] (from <start>)."""
    carry, keys, values = self._memory(features)
    xs = self.drop(self.embed(tokens_BxL[:, :-1]), deterministic=not train)
    scan = nn.scan(lambda cell, carry, x, k, v: cell(carry, x, k, v),
                   variable_broadcast='params', split_rngs={'params': False},
                   in_axes=(1, nn.broadcast, nn.broadcast), out_axes=1)
    _, (outs_BxTxF, alphas_BxTxN) = scan(self.cell, carry, xs, keys, values)
    self.sow('intermediates', 'attention', alphas_BxTxN)
    return self._word_logits(self.drop(outs_BxTxF, deterministic=not train))

  def start(self, features):
    carry, keys, values = self._memory(features)
    start_B = jnp.full(features.shape[:1], 1, jnp.int32)  # <start> is id 1.
    return self.step((carry, keys, values), start_B)

  def step(self, state, token_B):
    carry, keys, values = state
    carry, (out, alpha) = self.cell(carry, self.embed(token_B), keys, values)
    self.sow('intermediates', 'step_attention', alpha)
    return (carry, keys, values), self._word_logits(out)
