"""Self-critical training's parts: rewards (CIDEr-D with <end> counted), advantages, the
sampler, the SCST step on every decoder, and the expected reward it raises on a toy model."""
import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import runs as rh
from capjax.caption import config as caption_config
from capjax.caption import decoding, scst, steps
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError
from capjax.models import cnn, decoder
from capjax.models.captioner import Captioner
from capjax.train import state as state_lib

REFERENCES = [['a red circle', 'a red circle left of a star', 'the red circle'],
              ['a blue square', 'one blue square'],
              ['a green star above a square', 'a star above a square', 'green star']]
VOCAB = Vocabulary.build(c for refs in REFERENCES for c in refs)
END, MAX_LEN, K = VOCAB.end_id, 8, 4


def _ids(text, end=True):
  return [VOCAB.ids[w] for w in text.split()] + ([END] if end else [])


def _rows(*captions, length=MAX_LEN):
  """Decoded rows as the sampler writes them: ids, <pad> after <end>."""
  return np.array([ids + [0] * (length - len(ids)) for ids in captions], np.int32)


@pytest.fixture(scope='module')
def rewards():
  return scst.CaptionRewards(VOCAB, REFERENCES)


def test_a_caption_equal_to_a_reference_scores_highest(rewards):
  best = _ids('a blue square')
  others = [_ids('a blue'), _ids('a blue square square'), _ids('a red square'),
            _ids('one blue circle'), _ids('blue square a'), _ids('a blue square', end=False)]
  scores = rewards(np.array([1]), _rows(best, *others)[None])[0]
  assert scores[0] == scores.max() and (scores[0] > scores[1:]).all(), scores


def test_a_caption_without_end_scores_below_the_same_words_with_end(rewards):
  """<end> is a word on both sides, so a caption cut off where the references go on misses
  the n-grams that end them (SacreEOS); padding after <end> is not part of the caption."""
  ended, cut_off = _ids('a red circle'), _ids('a red circle', end=False)
  scores = rewards(np.array([0]), _rows(ended, cut_off, cut_off + [0, 0, 0])[None])[0]
  assert scores[0] > scores[1] == scores[2]


def test_a_reference_word_outside_the_vocabulary_is_never_matched_by_unk():
  vocab = Vocabulary(['a', 'dog'])  # 'zebra' is not in it.
  rewards = scst.CaptionRewards(vocab, [['a zebra'], ['a dog']])
  unk, zebra_free = [vocab.ids['a'], vocab.unk_id, END], [vocab.ids['a'], END]
  scores = rewards(np.array([0]), _rows(unk, zebra_free)[None])[0]
  assert scores[0] <= scores[1]


def test_bleu_weight_adds_that_many_times_sentence_bleu_4_to_cider_d(rewards):
  captions = _rows(_ids('a blue square'), _ids('one blue square'), _ids('a red square'),
                   _ids('blue'))[None]
  mixed = scst.CaptionRewards(VOCAB, REFERENCES, bleu_weight=0.5)
  bleu_4 = mixed.bleu([1] * 4, [scst.caption_ids(row, END) for row in captions[0]])[:, 3]
  assert bleu_4[0] > 0.9 and bleu_4[3] < 0.01  # A reference itself; a one-word caption.
  np.testing.assert_allclose(mixed(np.array([1]), captions)[0],
                             rewards(np.array([1]), captions)[0] + 0.5 * bleu_4, rtol=1e-12)
  assert rewards.bleu is None  # bleu_weight 0 builds no BLEU scorer.


def test_advantages_subtract_the_greedy_reward_or_the_mean_of_the_other_samples():
  rewards_BxK = np.array([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
  greedy_B = np.array([2.0, 5.0])
  np.testing.assert_allclose(scst.advantages(rewards_BxK, greedy_B, 'greedy'),
                             [[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  # Sample 0 of image 0: 1 - mean(3, 2) = -1.5; a better sample gets a positive advantage.
  np.testing.assert_allclose(scst.advantages(rewards_BxK, greedy_B, 'mean'),
                             [[-1.5, 1.5, 0.0], [0.0, 0.0, 0.0]])


def test_sample_statistics_count_words_without_end_and_distinct_n():
  stats = scst.sample_statistics(_rows(_ids('a red circle'), _ids('a red'))[None], END)
  assert stats['sample_length'] == 2.5
  assert stats['distinct_1'] == 3 / 5 and stats['distinct_2'] == 2 / 3


def test_mean_baseline_with_one_sample_is_one_user_error_naming_the_flags():
  config = rh.load_config('caption', 'runlocal')
  config.train.scst_steps = 5
  config.scst.num_samples = 1
  with pytest.raises(UserError, match=r'--config.scst.baseline=mean .* '
                                      r'--config.scst.num_samples >= 2 \(got 1\)'):
    caption_config.validate(config)
  config.scst.baseline = 'greedy'
  caption_config.validate(config)


def test_the_scst_phase_crops_as_the_data_config_unless_scst_sets_its_own():
  config = rh.load_config('caption', 'dataset=flickr8k')
  assert scst.crop_min_area(config) == config.data.crop_min_area == 0.5
  config.scst.crop_min_area = 1.0
  assert scst.crop_min_area(config) == 1.0 and config.data.crop_min_area == 0.5
  config.scst.crop_min_area = 0.0
  with pytest.raises(UserError, match=r'--config.scst.crop_min_area=0.0 .* fraction in \(0, 1\]'):
    caption_config.validate(config)


DECODERS = {
    'inject': lambda v: decoder.InjectDecoder(v, 8, 16, every_step=True),
    'merge': lambda v: decoder.MergeDecoder(v, 8, 16),
    'attention': lambda v: decoder.AttentionDecoder(v, 8, 16, attn_dim=8, score='dot',
                                                    coverage=True, query='current'),
}


def _toy(name, vocab_size=len(VOCAB), images=3, learning_rate=3e-2):
  model = Captioner(cnn.CaptionEncoderTiny(), DECODERS[name](vocab_size))
  pixels = jax.random.randint(jax.random.key(1), (images, 16, 16, 3), 0, 256).astype(jnp.uint8)
  state = state_lib.create(model, optax.adam(learning_rate), jax.random.key(0), pixels,
                           jnp.zeros((images, MAX_LEN + 1), jnp.int32))
  return model, state, pixels


def _sampler(model, num_samples=K):
  return decoding.make_sampler_fn(model, num_samples=num_samples, max_len=MAX_LEN, end_id=END,
                                  banned_ids=scst.BANNED)


def _teacher_forced_log_probs(model, variables, pixels, samples_BxKxT):
  """B x K summed log-probs of the samples from a teacher-forced pass (the reference for the
  sampler's own): <pad>/<start> excluded from the softmax, <pad> positions masked."""
  b, k, t = samples_BxKxT.shape
  samples = samples_BxKxT.reshape(b * k, t)
  tokens = jnp.concatenate([jnp.full((b * k, 1), VOCAB.start_id, samples.dtype), samples], 1)
  features = model.apply(variables, pixels, method='encode')
  logits = model.apply(variables, jnp.repeat(features, k, axis=0), tokens, method='decode')
  logits = logits.at[..., jnp.asarray(scst.BANNED)].set(decoding.NEG)
  log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), samples[..., None], -1)[..., 0]
  return (log_p * (samples != VOCAB.pad_id)).sum(-1).reshape(b, k)


def _step_batch(draws, advantages):
  return scst.step_batch(draws, jnp.asarray(advantages, jnp.float32))


def test_sampling_is_reproducible_from_the_rng_and_its_greedy_captions_are_greedy():
  model, state, pixels = _toy('attention')
  variables, sample = state_lib.variables(state), _sampler(model)
  samples, greedy = sample(variables, pixels, jax.random.key(7))[:2]
  again = sample(variables, pixels, jax.random.key(7)).samples
  other = sample(variables, pixels, jax.random.key(8)).samples
  assert samples.shape == (3, K, MAX_LEN) and greedy.shape == (3, MAX_LEN)
  np.testing.assert_array_equal(samples, again)
  assert (np.asarray(samples) != np.asarray(other)).any()
  features = model.apply(variables, pixels, method='encode')
  np.testing.assert_array_equal(greedy, decoding.greedy(model.apply, variables, features,
                                                        max_len=MAX_LEN, end_id=END))
  rows = np.asarray(samples).reshape(-1, MAX_LEN)
  assert not np.isin(rows[:, 0], scst.BANNED).any()  # <pad>/<start> are never drawn.
  for row in rows:  # <pad> only after <end>.
    ends = np.flatnonzero(row == END)
    assert (row[ends[0] + 1:] == 0).all() if ends.size else (row != 0).all(), row


def test_first_words_are_drawn_with_the_models_probabilities():
  """Temperature 1: the first word's frequencies over many draws follow the softmax (with
  <pad>/<start> excluded) of the model's first logits."""
  model, state, pixels = _toy('inject', images=1)
  variables = state_lib.variables(state)
  variables = jax.tree_util.tree_map_with_path(  # A first word far from uniform.
      lambda p, x: x + jnp.linspace(-2, 2, x.shape[0]) if 'out' in str(p) and 'bias' in str(p)
      else x, variables)
  samples = _sampler(model, num_samples=4000)(variables, pixels, jax.random.key(0)).samples
  features = model.apply(variables, pixels, method='encode')
  _, logits = model.apply(variables, features, method='start')
  v = len(VOCAB)  # log p of every word as if it were the first: V rows of the one logits.
  banned = jnp.zeros((1, v)).at[:, jnp.asarray(scst.BANNED)].set(decoding.NEG)
  probs = np.exp(np.asarray(decoding.policy_log_prob(
      jnp.broadcast_to(logits, (v, v)), jnp.arange(v), banned)))
  assert probs[list(scst.BANNED)].max() < 1e-6 and probs.sum() == pytest.approx(1.0)
  counts = np.bincount(np.asarray(samples)[0, :, 0], minlength=len(VOCAB)) / 4000
  np.testing.assert_allclose(counts, probs, atol=0.025)


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_the_samplers_log_probs_and_pullback_are_a_teacher_forced_passs(name):
  """The gradient comes from the sampling scan's own forward pass: its log-probs and the
  pullback of any weighting of them equal those of a teacher-forced pass over the samples."""
  model, state, pixels = _toy(name)
  variables = state_lib.variables(state)
  draws = _sampler(model)(variables, pixels, jax.random.key(3))
  weights = jax.random.normal(jax.random.key(4), (3, K))
  reference, grads = jax.value_and_grad(lambda p: (weights * _teacher_forced_log_probs(
      model, state_lib.variables(state, p), pixels, draws.samples)).sum())(state.params)
  np.testing.assert_allclose((weights * draws.log_probs).sum(), reference, rtol=1e-5)
  (pulled,) = draws.pullback(weights)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               pulled, grads)


def test_with_the_encoder_frozen_the_decoder_gets_the_same_gradient_and_the_encoder_none():
  """scst.train_encoder=False: the same samples and log-probs, the decoder's gradient of the
  full pullback, a zero gradient for the encoder, and a step that leaves the encoder as it
  was while it moves the rest."""
  model, state, pixels = _toy('attention')
  variables = state_lib.variables(state)
  frozen_sampler = decoding.make_sampler_fn(model, num_samples=K, max_len=MAX_LEN, end_id=END,
                                            banned_ids=scst.BANNED, train_encoder=False)
  full, frozen = (s(variables, pixels, jax.random.key(3)) for s in (_sampler(model),
                                                                     frozen_sampler))
  np.testing.assert_array_equal(full.samples, frozen.samples)
  np.testing.assert_allclose(full.log_probs, frozen.log_probs, rtol=1e-6)
  weights = jax.random.normal(jax.random.key(4), (3, K))
  (full_grads,), (frozen_grads,) = full.pullback(weights), frozen.pullback(weights)
  assert optax.tree.norm(full_grads['encoder']) > 0
  assert float(optax.tree.norm(frozen_grads['encoder'])) == 0.0
  rest = lambda g: {k: v for k, v in g.items() if k != 'encoder'}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               rest(frozen_grads), rest(full_grads))
  step = jax.jit(functools.partial(steps.scst_train_step, train_encoder=False))
  moved, _ = step(state, _step_batch(frozen, weights), jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, moved.params['encoder'], state.params['encoder'])
  assert optax.tree.norm(jax.tree.map(jnp.subtract, rest(moved.params),
                                      rest(state.params))) > 0


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_an_scst_step_weights_each_sample_by_its_advantage(name):
  """On every decoder: a zero advantage gives a zero gradient, and a positive one raises the
  log-probability of that sample (the step moves the policy towards it)."""
  model, state, pixels = _toy(name)
  draws = _sampler(model)(state_lib.variables(state), pixels, jax.random.key(3))
  step = jax.jit(steps.scst_train_step)
  _, still = step(state, _step_batch(draws, jnp.zeros((3, K))), jax.random.key(0))
  assert float(still['grad_norm']) == 0.0
  towards = jnp.zeros((3, K)).at[:, 0].set(1.0)
  moved, metrics = step(state, _step_batch(draws, towards), jax.random.key(0))
  assert np.isfinite(float(metrics['scst_loss'])) and float(metrics['grad_norm']) > 0
  # The loss is -mean(advantage * log p): the favoured samples got likelier.
  before, after = (_teacher_forced_log_probs(model, state_lib.variables(s), pixels,
                                             draws.samples)[:, 0] for s in (state, moved))
  assert (after > before).all(), (before, after)


def _expected_reward(sample, state, pixels, rewards, draws=16):
  """Monte-Carlo estimate of E[CIDEr-D] of the model's samples: draws x K per image."""
  total = 0.0
  for d in range(draws):
    samples = sample(state_lib.variables(state), pixels, jax.random.key(1000 + d)).samples
    total += rewards(np.arange(len(pixels)), np.asarray(samples)).mean()
  return total / draws


def test_scst_steps_raise_the_expected_reward_of_a_toy_captioner(rewards):
  model, state, pixels = _toy('inject', learning_rate=0.1)
  sample, step = _sampler(model), jax.jit(steps.scst_train_step)
  before = _expected_reward(sample, state, pixels, rewards)
  for t in range(40):
    draws = sample(state_lib.variables(state), pixels, jax.random.key(t))
    r = rewards(np.arange(3), np.asarray(draws.samples))
    greedy_r = rewards(np.arange(3), np.asarray(draws.greedy)[:, None])[:, 0]
    state, _ = step(state, _step_batch(draws, scst.advantages(r, greedy_r, 'mean')),
                    jax.random.key(0))
  after = _expected_reward(sample, state, pixels, rewards)
  assert after > 2 * before, (before, after)


SHARDED_SCRIPT = textwrap.dedent('''
    import functools, sys
    sys.path[:0] = ['tests', 'tests/caption']
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update('jax_numpy_rank_promotion', 'raise')
    import test_scst as t
    from capjax.caption import scst, steps
    from capjax.train import sharding, state as state_lib

    assert len(jax.devices()) == 4, jax.devices()
    import optax
    model, state0, _ = t._toy('inject')
    # SGD: Adam's first step divides each gradient by its own size, which magnifies the
    # rounding differences of a sharded sum in near-zero gradients.
    state0 = state0.replace(tx=optax.sgd(0.1), opt_state=optax.sgd(0.1).init(state0.params))
    pixels = jax.random.randint(jax.random.key(5), (8, 16, 16, 3), 0, 256).astype(jnp.uint8)
    rewards = scst.CaptionRewards(t.VOCAB, t.REFERENCES)
    batch = {'image': np.asarray(pixels), 'index': np.arange(8, dtype=np.int32) % 3}

    def run(devices):
      """One SCST step as the loop runs it: prepare (decode, host reward), jitted step."""
      mesh = sharding.make_mesh(devices)
      state = jax.device_put(state0, sharding.replicated(mesh)(state0))
      state_sh = sharding.replicated(mesh)(state)
      # As the loop compiles a prepared phase's step: the batch keeps its own shardings.
      step = jax.jit(steps.scst_train_step, in_shardings=(state_sh, None, None),
                     out_shardings=(state_sh, None))
      drawn = []
      def sampler(*args):
        drawn.append(t._sampler(model)(*args))
        return drawn[-1]
      step_batch, host = scst.prepare_batch(state, sharding.put_batch(batch, mesh),
                                            jax.random.key(1), 3, sampler=sampler,
                                            rewards=rewards, baseline='mean',
                                            input_key='image')
      assert len(drawn[0].samples.sharding.device_set) == len(devices)
      assert len(step_batch['advantages'].sharding.device_set) == len(devices)
      state, metrics = step(state, step_batch, jax.random.key(0))
      return jax.device_get((drawn[0].samples, step_batch['advantages'], host,
                             state.params, metrics))

    s4, a4, h4, p4, m4 = run(jax.devices())
    s1, a1, h1, p1, m1 = run(jax.devices()[:1])
    np.testing.assert_array_equal(s4, s1)  # The same draws however the batch is split.
    np.testing.assert_allclose(a4, a1, rtol=0, atol=1e-6)
    assert h4 == h1, (h4, h1)
    np.testing.assert_allclose(m4['scst_loss'], m1['scst_loss'], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)
    print('SCST_SHARDED_OK', h4['sample_reward'])
''')


def test_an_scst_step_over_four_devices_draws_and_learns_as_on_one():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', SHARDED_SCRIPT], env=env, capture_output=True,
                       text=True, timeout=600, cwd=rh.ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'SCST_SHARDED_OK' in out.stdout
