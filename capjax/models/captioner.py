"""Encoder + decoder, with `encode`/`decode` apart so the encoder can be frozen."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# The concept head's starting bias: sigmoid(-4) = 1.8%, about how often a vocabulary word is
# among an image's reference words, so the first steps are not spent unlearning 50% for all.
_CONCEPT_BIAS = -4.0


class Captioner(nn.Module):
  """`encoder(images) -> features`; `decoder(features, tokens) -> logits`.

  With `concepts` > 0, `decode` also sows 'concept_logits' (B x concepts, float32): a
  LayerNorm + Dense head on the mean-pooled features that predicts which vocabulary words the
  image's captions use (multi-label, as Fang et al. 2015's visual concepts). Training it gives
  the encoder a direct signal of what is in the picture besides the one that reaches it
  through the decoder; captions never read it.
  """
  encoder: nn.Module
  decoder: nn.Module
  concepts: int = 0

  def setup(self):
    if self.concepts:
      self.concept_norm = nn.LayerNorm()
      self.concept_head = nn.Dense(self.concepts,
                                   bias_init=nn.initializers.constant(_CONCEPT_BIAS))

  def __call__(self, images, tokens, train: bool = False):
    return self.decode(self.encode(images, train), tokens, train)

  def encode(self, images, train: bool = False):
    return self.encoder(images, train=train)

  def decode(self, features, tokens, train: bool = False):
    if self.concepts:
      self.sow('intermediates', 'concept_logits', self.concept_logits(features))
    return self.decoder(features, tokens, train=train)

  def concept_logits(self, features):
    pooled_BxC = features.reshape(features.shape[0], -1, features.shape[-1]).mean(1)
    return self.concept_head(self.concept_norm(pooled_BxC.astype(jnp.float32)))

  def start(self, features):
    return self.decoder.start(features)

  def step(self, carry, token):
    return self.decoder.step(carry, token)
