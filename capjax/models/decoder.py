"""LSTM caption decoders (Show-and-Tell "init-inject").

Training runs the whole sequence with teacher forcing under `nn.scan`; decoding
calls the very same cell one step at a time (`start` + `step`), so greedy and beam
search share the trained weights without any reshaping.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _scan_cell(cell, carry, xs_BxTxE):
  """Runs `cell` over time with shared params (the flax seq2seq/sst2 pattern)."""
  scan = nn.scan(lambda c, carry, x: c(carry, x), variable_broadcast='params',
                 split_rngs={'params': False}, in_axes=1, out_axes=1)
  return scan(cell, carry, xs_BxTxE)


class InjectDecoder(nn.Module):
  """Image feature -> LSTM initial state *and* step-0 input; words after that.

  `features` is the encoder's grid B x h x w x C (or B x C pooled). The grid is
  flattened, not averaged: which object is left of which lives in the positions.
  """
  vocab_size: int
  embed_dim: int = 128
  hidden: int = 256
  pool: str = 'flatten'  # 'flatten' keeps layout; 'mean' for big pretrained grids.
  every_step: bool = False  # Also feed the image embedding with every word ("par-inject").
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.image_proj = nn.Dense(self.embed_dim, dtype=self.dtype, name='image_proj')
    self.init_h = nn.Dense(self.hidden, dtype=self.dtype, name='init_h')
    self.init_c = nn.Dense(self.hidden, dtype=self.dtype, name='init_c')
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, name='embed')
    self.cell = nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype, name='lstm')
    self.drop = nn.Dropout(self.dropout)
    self.out = nn.Dense(self.vocab_size, dtype=jnp.float32, name='out')

  def _image(self, features):
    b = features.shape[0]
    flat = features.reshape(b, -1) if self.pool == 'flatten' else features.reshape(
        b, -1, features.shape[-1]).mean(1)
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
    _, hs_BxTxH = _scan_cell(self.cell, carry, xs)
    return self.out(self.drop(hs_BxTxH, deterministic=not train))

  def start(self, features):
    """(carry, logits of the first word) from the image alone."""
    carry, v_BxE = self._image(features)
    x = jnp.concatenate([v_BxE, v_BxE], -1) if self.every_step else v_BxE
    carry, h = self.cell(carry, x)
    return (carry, v_BxE), self.out(h)

  def step(self, state, token_B):
    """(state, logits of the next word) after feeding `token_B`."""
    carry, v_BxE = state
    x = self.embed(token_B)
    if self.every_step:
      x = jnp.concatenate([x, v_BxE.astype(x.dtype)], -1)
    carry, h = self.cell(carry, x)
    return (carry, v_BxE), self.out(h)


class AttendStep(nn.Module):
  """One step of Show, Attend and Tell: attend over the grid, then an LSTM step."""
  hidden: int
  attn_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, x_BxE, keys_BxNxA, values_BxNxD):
    c, h = carry
    query = nn.Dense(self.attn_dim, dtype=self.dtype, name='query')(h)
    energy = nn.Dense(1, dtype=self.dtype, name='energy')(
        jnp.tanh(keys_BxNxA + query[:, None, :]))[..., 0]
    alpha_BxN = jax.nn.softmax(energy.astype(jnp.float32), -1)
    context = jnp.einsum('bn,bnd->bd', alpha_BxN.astype(values_BxNxD.dtype), values_BxNxD)
    # The gate lets the model say "no image needed here" (articles, relations).
    gate = nn.sigmoid(nn.Dense(1, dtype=self.dtype, name='gate')(h))
    inputs = jnp.concatenate([x_BxE, gate * context], -1)
    carry, h = nn.OptimizedLSTMCell(self.hidden, dtype=self.dtype, name='lstm')((c, h), inputs)
    return carry, (jnp.concatenate([h, context], -1), alpha_BxN)


class AttentionDecoder(nn.Module):
  """Show, Attend and Tell over the encoder's h x w grid.

  Attention weights of every step are kept with `sow('intermediates', 'attention')`
  so that the doubly stochastic regulariser and the attention plots can read them.
  """
  vocab_size: int
  embed_dim: int = 128
  hidden: int = 256
  attn_dim: int = 128
  dropout: float = 0.0
  dtype: Any = jnp.float32

  def setup(self):
    self.keys = nn.Dense(self.attn_dim, dtype=self.dtype, name='keys')
    self.values = nn.Dense(self.hidden, dtype=self.dtype, name='values')
    self.init_h = nn.Dense(self.hidden, dtype=self.dtype, name='init_h')
    self.init_c = nn.Dense(self.hidden, dtype=self.dtype, name='init_c')
    self.embed = nn.Embed(self.vocab_size, self.embed_dim, name='embed')
    self.cell = AttendStep(self.hidden, self.attn_dim, self.dtype, name='attend')
    self.drop = nn.Dropout(self.dropout)
    self.out = nn.Dense(self.vocab_size, dtype=jnp.float32, name='out')

  def _memory(self, features):
    b, c = features.shape[0], features.shape[-1]
    grid_BxNxC = features.reshape(b, -1, c)
    mean = grid_BxNxC.mean(1)
    carry = (jnp.tanh(self.init_c(mean)), jnp.tanh(self.init_h(mean)))
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
    return self.out(self.drop(outs_BxTxF, deterministic=not train))

  def start(self, features):
    carry, keys, values = self._memory(features)
    start_B = jnp.full(features.shape[:1], 1, jnp.int32)  # <start> is id 1.
    return self.step((carry, keys, values), start_B)

  def step(self, state, token_B):
    carry, keys, values = state
    carry, (out, alpha) = self.cell(carry, self.embed(token_B), keys, values)
    self.sow('intermediates', 'step_attention', alpha)
    return (carry, keys, values), self.out(out)
