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
    xs = self.drop(xs, deterministic=not train)
    _, hs_BxTxH = _scan_cell(self.cell, carry, xs)
    return self.out(self.drop(hs_BxTxH, deterministic=not train))

  def start(self, features):
    """(carry, logits of the first word) from the image alone."""
    carry, v_BxE = self._image(features)
    carry, h = self.cell(carry, v_BxE)
    return carry, self.out(h)

  def step(self, carry, token_B):
    """(carry, logits of the next word) after feeding `token_B`."""
    carry, h = self.cell(carry, self.embed(token_B))
    return carry, self.out(h)
