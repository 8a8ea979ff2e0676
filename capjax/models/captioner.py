"""Encoder + decoder, with `encode`/`decode` apart so the encoder can be frozen."""
from __future__ import annotations

import flax.linen as nn


class Captioner(nn.Module):
  """`encoder(images) -> features`; `decoder(features, tokens) -> logits`."""
  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, images, tokens, train: bool = False):
    return self.decode(self.encode(images, train), tokens, train)

  def encode(self, images, train: bool = False):
    return self.encoder(images, train=train)

  def decode(self, features, tokens, train: bool = False):
    return self.decoder(features, tokens, train=train)

  def start(self, features):
    return self.decoder.start(features)

  def step(self, carry, token):
    return self.decoder.step(carry, token)
