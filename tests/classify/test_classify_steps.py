"""Classification train/eval steps: a golden-value step, smoothing/mixing, eval sums."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from capjax.classify import steps as classify_steps
from capjax.models import classifier
from capjax.train import state as state_lib


def _fixed_state(dropout=0.0, tx=None):
  """CNNTiny with parameters set by formula, so the golden values do not depend on init."""
  model = classifier.CNNTiny(num_classes=5, dropout=dropout)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  leaves, treedef = jax.tree.flatten(variables['params'])
  params = jax.tree.unflatten(treedef, [
      jnp.asarray(0.3 * np.sin(np.arange(leaf.size) * (i + 1.0)).reshape(leaf.shape),
                  jnp.float32) for i, leaf in enumerate(leaves)])
  return state_lib.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=tx or optax.sgd(0.1, momentum=0.9),
                                     batch_stats=variables['batch_stats'])


def _batch():
  x = jnp.asarray(np.cos(np.arange(2 * 8 * 8 * 3) * 0.37).reshape(2, 8, 8, 3), jnp.float32)
  return {'image': x, 'label': jnp.array([1, 3], jnp.int32)}


def test_train_step_golden_values():
  new, m = classify_steps.classify_train_step(_fixed_state(), _batch(), jax.random.key(0),
                                              label_smoothing=0.1)
  np.testing.assert_allclose(float(m['objective']), 1.5511644, rtol=2e-5)
  np.testing.assert_allclose(float(m['loss']), 1.5430351, rtol=2e-5)
  np.testing.assert_allclose(float(m['grad_norm']), 0.5813104, rtol=2e-5)
  assert float(m['accuracy']) == 0.0
  np.testing.assert_allclose(float(new.params['head']['kernel'].sum()), 0.2560289, rtol=1e-4)
  np.testing.assert_allclose(float(new.params['stage1_conv1']['kernel'].sum()), 0.0353071,
                             rtol=1e-4)
  # BatchNorm running mean moved 10% of the way to the batch mean (momentum 0.9).
  np.testing.assert_allclose(float(new.batch_stats['stage1_bn1']['mean'].sum()), 2.867059e-4,
                             rtol=1e-3)
  assert int(new.step) == 1


def test_objective_is_smoothed_cross_entropy_and_loss_is_plain():
  state, batch = _fixed_state(), _batch()
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                             batch['image'], train=True, mutable=['batch_stats'])
  log_p = np.asarray(jax.nn.log_softmax(logits), np.float64)
  target = np.full((2, 5), 0.1 / 5) + 0.9 * np.eye(5)[[1, 3]]
  _, m = classify_steps.classify_train_step(state, batch, jax.random.key(0),
                                            label_smoothing=0.1)
  np.testing.assert_allclose(float(m['objective']), -(target * log_p).sum(1).mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m['loss']), -log_p[[0, 1], [1, 3]].mean(), rtol=1e-5)


def test_mixed_batches_weight_the_two_labels():
  state, batch = _fixed_state(), _batch()
  step = functools.partial(classify_steps.classify_train_step, rng=jax.random.key(0),
                           label_smoothing=0.0)
  plain = step(state, batch)[1]['objective']
  other = step(state, {**batch, 'label': batch['label'][::-1]})[1]['objective']
  for mix in (1.0, 0.0, 0.3):
    mixed = step(state, {**batch, 'label_b': batch['label'][::-1],
                         'mix': jnp.full((2,), mix, jnp.float32)})[1]['objective']
    np.testing.assert_allclose(float(mixed), mix * float(plain) + (1 - mix) * float(other),
                               rtol=1e-5)


def test_dropout_masks_are_a_function_of_the_rng_and_the_step():
  state, batch = _fixed_state(dropout=0.5), _batch()
  step = jax.jit(classify_steps.classify_train_step)
  a = step(state, batch, jax.random.key(3))[1]['objective']
  b = step(state, batch, jax.random.key(3))[1]['objective']
  c = step(state.replace(step=7), batch, jax.random.key(3))[1]['objective']
  assert float(a) == float(b) and float(a) != float(c)


def test_eval_step_sums_over_valid_rows_only():
  state = _fixed_state()
  x = jnp.asarray(np.sin(np.arange(4 * 8 * 8 * 3) * 0.11).reshape(4, 8, 8, 3), jnp.float32)
  labels = jnp.array([0, 1, 2, 3], jnp.int32)
  valid = jnp.array([True, True, True, False])
  out = classify_steps.classify_eval_step(state, {'image': x, 'label': labels,
                                                  'valid': valid})
  logits = np.asarray(classify_steps.classify_logits(state, x), np.float64)[:3]
  log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(float(out['loss_sum']), -log_p[[0, 1, 2], [0, 1, 2]].sum(),
                             rtol=1e-5)
  assert float(out['count']) == 3.0
  assert float(out['correct_sum']) == float((logits.argmax(1) == [0, 1, 2]).sum())
  assert float(out['top5_sum']) == 3.0  # 5 classes: top-5 always hits.


def test_flip_average_is_the_mean_over_mirror_images_and_flip_invariant():
  state = _fixed_state()
  x = jnp.asarray(np.random.RandomState(0).randn(2, 8, 8, 3), jnp.float32)
  mirrored = x[:, :, ::-1]
  plain = classify_steps.classify_logits(state, x)
  averaged = classify_steps.classify_logits(state, x, flip_average=True)
  np.testing.assert_allclose(
      averaged, 0.5 * (plain + classify_steps.classify_logits(state, mirrored)), rtol=1e-6)
  np.testing.assert_allclose(
      classify_steps.classify_logits(state, mirrored, flip_average=True), averaged,
      rtol=1e-5, atol=1e-6)
  assert not np.allclose(plain, averaged)  # Random images are not mirror-symmetric.
