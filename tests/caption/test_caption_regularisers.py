"""Random resized crops, label smoothing and the concept head of the caption task."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from helpers import runs as rh
from capjax.caption import config as caption_config
from capjax.caption import pipeline, steps
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError
from capjax.models import cnn, decoder
from capjax.models.captioner import Captioner
from capjax.train import state as state_lib
from capjax.train.optim import make_optimizer


def _gradient_image(h=32, w=48):
  """Pixel (y, x) = (y, x, 0) in its first two channels, so a crop's pixels say where they
  came from."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  return np.stack([y * 4, x * 4, np.zeros_like(x)], -1).astype(np.uint8)


def test_random_resized_crop_keeps_the_size_and_shows_a_part_of_at_least_min_area():
  image = _gradient_image()
  for seed in range(20):
    out = pipeline.random_resized_crop(image, np.random.default_rng(seed), 0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    # The crop's rows and columns span >= sqrt(0.5 * 3/4) of the image's, less resampling.
    rows, cols = np.ptp(out[..., 0].astype(int)) / 4 + 1, np.ptp(out[..., 1].astype(int)) / 4 + 1
    assert rows * cols >= 0.5 * 32 * 48 * 0.85, (seed, rows, cols)
  a, b = (pipeline.random_resized_crop(image, np.random.default_rng(7), 0.5) for _ in range(2))
  np.testing.assert_array_equal(a, b)  # A function of the rng alone.
  c = pipeline.random_resized_crop(image, np.random.default_rng(8), 0.5)
  assert not np.array_equal(a, c)


def test_augmenter_without_crops_or_flips_returns_the_image_and_flips_mirror_it():
  image = _gradient_image()
  same = pipeline.augmenter()(image, np.random.default_rng(0))
  assert same is image
  flip = pipeline.augmenter(flip=True)
  views = [flip(image, np.random.default_rng(s)) for s in range(10)]
  assert any(np.array_equal(v, image[:, ::-1]) for v in views)
  assert any(v is image for v in views)


def test_train_batches_with_crops_are_reproducible_and_carry_concepts():
  vocab = Vocabulary.build(['a dog runs', 'a cat sits on a mat'])
  source = [{'image': _gradient_image(), 'captions': ['a dog runs', 'the cat sits']},
            {'image': _gradient_image(), 'captions': ['a mat', 'a mat']}]
  make = lambda: pipeline.caption_train_dataset(  # pylint: disable=g-long-lambda
      source, vocab, batch_size=2, caption_length=6, seed=3, crop_min_area=0.3, concepts=True)
  first, again = make()[0], make()[0]
  np.testing.assert_array_equal(first['image'], again['image'])
  assert first['concepts'].shape == (2, len(vocab)) and first['concepts'].dtype == np.float32
  plain = pipeline.caption_train_dataset(source, vocab, batch_size=2, caption_length=6, seed=3)[0]
  assert 'concepts' not in plain
  assert not np.array_equal(first['image'], plain['image'])  # Cropped.


def test_concept_targets_are_the_words_of_all_references_without_specials():
  vocab = Vocabulary.build(['a dog runs', 'a cat sits'])
  hot = pipeline.concept_targets(['A dog runs.', 'the dog'], vocab)  # 'the' is <unk>.
  assert set(np.flatnonzero(hot)) == {vocab.ids['a'], vocab.ids['dog'], vocab.ids['runs']}
  assert hot.sum() == 3


def test_smoothed_token_loss_equals_cross_entropy_with_optax_smoothed_labels():
  logits = jax.random.normal(jax.random.key(0), (2, 4, 9)) * 3
  targets = jnp.asarray([[4, 5, 2, 0], [6, 2, 0, 0]])
  mask = (targets != 0).astype(jnp.float32)
  expected = (optax.softmax_cross_entropy(
      logits, optax.smooth_labels(jax.nn.one_hot(targets, 9), 0.1)) * mask).sum()
  np.testing.assert_allclose(steps.smoothed_token_loss(logits, targets, 0.1), expected,
                             rtol=1e-6)
  ce, _, _ = steps.masked_token_stats(logits, targets)
  np.testing.assert_allclose(steps.smoothed_token_loss(logits, targets, 0.0), ce, rtol=1e-6)


def test_concept_loss_golden_value():
  logits = jnp.asarray([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]])
  targets = jnp.asarray([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
  bce = lambda x, t: np.log1p(np.exp(-x)) if t else np.log1p(np.exp(x))  # pylint: disable=g-long-lambda
  first = (bce(0.0, 0) + bce(2.0, 1) + bce(-1.0, 1)) / 2  # Two words.
  second = bce(1.0, 0) + 2 * bce(0.0, 0)  # No words: divided by 1.
  np.testing.assert_allclose(steps.concept_loss(logits, targets), (first + second) / 2,
                             rtol=1e-6)


def _state(concepts: int):
  v = 11
  model = Captioner(cnn.CaptionEncoderTiny(), decoder.AttentionDecoder(v, 8, 16, attn_dim=8),
                    concepts=concepts)
  optim = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=1e-2, warmup_steps=0, final_lr_fraction=1.0,
      weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=1.0,
      encoder_lr_scale=1.0))
  images = jnp.asarray(np.arange(2 * 16 * 16 * 3).reshape(2, 16, 16, 3) % 251, jnp.uint8)
  tokens = jnp.asarray([[1, 4, 5, 6, 2, 0, 0], [1, 7, 8, 2, 0, 0, 0]], jnp.int32)
  hot = np.zeros((2, v), np.float32)
  hot[0, [4, 5, 6]] = hot[1, [7, 8]] = 1.0
  state = state_lib.create(model, make_optimizer(optim, 10), jax.random.key(0), images, tokens)
  return state, {'image': images, 'tokens': tokens, 'concepts': jnp.asarray(hot)}


def test_the_concept_head_trains_the_encoder_and_leaves_the_logged_loss_plain():
  plain_state, batch = _state(concepts=0)
  assert 'concept_head' not in plain_state.params
  state, _ = _state(concepts=11)
  assert state.params['concept_head']['kernel'].shape[-1] == 11
  step = jax.jit(steps.caption_train_step, static_argnames=('concept_weight',))
  plain_new, plain = step(plain_state, batch, jax.random.key(0))
  new, metrics = step(state, batch, jax.random.key(0), concept_weight=1.0)
  # The encoder and decoder start equal, so the cross-entropy is the plain model's.
  np.testing.assert_allclose(metrics['loss'], plain['loss'], rtol=1e-6)
  assert 'concept_loss' not in plain and float(metrics['concept_loss']) > 0
  # The concept loss reaches the encoder: its update differs from the plain step's.
  assert _max_difference(new.params['encoder'], plain_new.params['encoder']) > 0
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch, jax.random.key(0), concept_weight=1.0)
    losses.append(float(metrics['concept_loss']))
  assert losses[-1] < 0.5 * losses[0]


def _max_difference(a, b) -> float:
  return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_label_smoothing_changes_the_gradient_but_not_the_logged_loss():
  state, batch = _state(concepts=0)
  step = jax.jit(steps.caption_train_step, static_argnames=('label_smoothing',))
  plain_state, plain = step(state, batch, jax.random.key(0))
  smooth_state, smooth = step(state, batch, jax.random.key(0), label_smoothing=0.1)
  np.testing.assert_allclose(smooth['loss'], plain['loss'], rtol=1e-6)
  assert _max_difference(smooth_state.params['decoder'], plain_state.params['decoder']) > 0


@pytest.mark.parametrize('field, value, message', [
    ('data.crop_min_area', 0.0, r'--config.data.crop_min_area=0.0 .*\(0, 1\]'),
    ('data.crop_min_area', 1.5, r'--config.data.crop_min_area=1.5'),
    ('train.label_smoothing', 1.0, r'--config.train.label_smoothing=1.0'),
    ('model.concept_weight', -1.0, r'--config.model.concept_weight=-1.0'),
])
def test_bad_regulariser_values_are_one_user_error_naming_the_field(field, value, message):
  config = rh.load_config('caption', 'runlocal')
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(UserError, match=message):
    caption_config.validate(config)


def test_the_doubly_stochastic_penalty_still_reaches_the_attention_decoder():
  state, batch = _state(concepts=11)  # Its sown concept logits sit beside the attention.
  step = jax.jit(steps.caption_train_step, static_argnames=('attention_reg',))
  plain, _ = step(state, batch, jax.random.key(0))
  penalised, _ = step(state, batch, jax.random.key(0), attention_reg=1.0)
  assert _max_difference(penalised.params['decoder'], plain.params['decoder']) > 0
