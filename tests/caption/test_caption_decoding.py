"""Captioner shapes, step-by-step decoding == teacher forcing, beam vs greedy, one step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from capjax.caption import decoding, steps
from capjax.caption import evaluate as caption_eval
from capjax.data.tokenizer import Vocabulary
from capjax.errors import UserError
from capjax.models import cnn, decoder
from capjax.models.captioner import Captioner
from capjax.train import state as state_lib

V, L = 11, 9


DECODERS = {
    'inject': lambda: decoder.InjectDecoder(V, 8, 16),
    'par_inject': lambda: decoder.InjectDecoder(V, 8, 16, every_step=True),
    'attention': lambda: decoder.AttentionDecoder(V, 8, 16, attn_dim=8),
    'attention_dot': lambda: decoder.AttentionDecoder(V, 8, 16, attn_dim=8, score='dot'),
    'attention_coverage': lambda: decoder.AttentionDecoder(V, 8, 16, attn_dim=8, score='dot',
                                                           coverage=True),
    'attention_current': lambda: decoder.AttentionDecoder(V, 8, 16, attn_dim=8, score='dot',
                                                          coverage=True, query='current'),
}


def _with_random_coverage_scale(variables):
  """The coverage scale starts at 0 (no effect); a random one makes the tests see it work."""
  def perturb(path, x):
    names = [getattr(k, 'key', '') for k in path]
    if 'coverage_scale' in names and names[-1] == 'kernel':
      return 3.0 * jax.random.normal(jax.random.key(3), x.shape, x.dtype)
    return x
  return jax.tree_util.tree_map_with_path(perturb, variables)


def _model_and_inputs(name):
  model = Captioner(cnn.CaptionEncoderTiny(), DECODERS[name]())
  images = jax.random.randint(jax.random.key(1), (4, 16, 16, 3), 0, 256).astype(jnp.uint8)
  tokens = jax.random.randint(jax.random.key(2), (4, L), 3, V).at[:, 0].set(1)  # <start>
  return model, jax.jit(model.init)(jax.random.key(0), images, tokens), images, tokens


@pytest.fixture(scope='module', params=sorted(DECODERS))
def model_and_vars(request):
  model, variables, images, tokens = _model_and_inputs(request.param)
  return model, _with_random_coverage_scale(variables), images, tokens


def test_logits_shape(model_and_vars):
  model, variables, images, tokens = model_and_vars
  assert model.apply(variables, images, tokens).shape == (4, L - 1, V)


def test_attention_weights_sum_to_one(model_and_vars):
  model, variables, images, tokens = model_and_vars
  _, inter = model.apply(variables, images, tokens, mutable=['intermediates'])
  for alphas in jax.tree.leaves(inter):
    assert alphas.shape[:2] == (4, L - 1)
    np.testing.assert_allclose(alphas.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('name', ['attention_coverage', 'attention_current'])
def test_coverage_sums_past_attention_and_steers_the_scores(name):
  model, initial, images, tokens = _model_and_inputs(name)
  variables = _with_random_coverage_scale(initial)
  features = model.apply(variables, images, method='encode')
  state, _ = model.apply(variables, features, method='start')  # Reads <start>: 1 attention.
  for t in range(1, L - 1):
    state, _ = model.apply(variables, state, tokens[:, t], method='step')
  (_, coverage, _), _, _ = state  # (LSTM carry, coverage, fed context), keys, values.
  _, inter = model.apply(variables, images, tokens, mutable=['intermediates'])
  np.testing.assert_allclose(coverage, jax.tree.leaves(inter)[0].sum(1), rtol=1e-5, atol=1e-6)
  # At init the scale is 0 and coverage changes nothing; a non-zero scale changes the logits.
  assert not np.allclose(model.apply(initial, images, tokens),
                         model.apply(variables, images, tokens), atol=1e-4)


def test_step_by_step_decoding_reproduces_teacher_forcing(model_and_vars):
  model, variables, images, tokens = model_and_vars
  full = model.apply(variables, images, tokens)
  features = model.apply(variables, images, method='encode')
  carry, logits = model.apply(variables, features, method='start')
  stepped = [logits]
  for t in range(1, L - 1):
    carry, logits = model.apply(variables, carry, tokens[:, t], method='step')
    stepped.append(logits)
  np.testing.assert_allclose(jnp.stack(stepped, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('max_len', [1, 2, L])
def test_beam_of_one_equals_greedy(model_and_vars, max_len):
  model, variables, images, _ = model_and_vars
  f = model.apply(variables, images, method='encode')
  g = decoding.greedy(model.apply, variables, f, max_len=max_len, end_id=2)
  b = decoding.beam_search(model.apply, variables, f, beam_size=1, max_len=max_len, end_id=2)
  assert b.shape == (f.shape[0], max_len)
  np.testing.assert_array_equal(g, b)


@pytest.mark.parametrize('decode', [decoding.greedy,
                                    functools.partial(decoding.beam_search, beam_size=2)],
                         ids=['greedy', 'beam'])
def test_decoding_no_tokens_is_one_user_error(decode):
  never_called = None  # The check comes before the model runs.
  with pytest.raises(UserError, match='max_len >= 1'):
    decode(never_called, {}, jnp.zeros((2, 4)), max_len=0, end_id=2)


def _greedy_reference(model, variables, features, max_len, end_id):
  """Greedy decoding as a plain Python loop of start/step calls."""
  carry, logits = model.apply(variables, features, method='start')
  done = np.zeros(features.shape[0], bool)
  out = []
  for _ in range(max_len):
    token = np.where(done, 0, np.argmax(np.asarray(logits), -1))
    out.append(token)
    done |= token == end_id
    carry, logits = model.apply(variables, carry, jnp.asarray(token, jnp.int32), method='step')
  return np.stack(out, 1)


@pytest.mark.parametrize('max_len', [1, 2, L])
def test_greedy_equals_a_step_by_step_loop(model_and_vars, max_len):
  model, variables, images, _ = model_and_vars
  f = model.apply(variables, images, method='encode')
  for end_id in (2, int(_greedy_reference(model, variables, f, 1, -1)[0, 0])):
    got = decoding.greedy(model.apply, variables, f, max_len=max_len, end_id=end_id)
    want = _greedy_reference(model, variables, f, max_len, end_id)
    assert got.shape == (f.shape[0], max_len)
    np.testing.assert_array_equal(got, want)


def _sequence_logprob(model, variables, features, seqs, end_id):
  """log p(seq | image) counting tokens up to and including the first <end>."""
  carry, logits = model.apply(variables, features, method='start')
  total = np.zeros(seqs.shape[0])
  done = np.zeros(seqs.shape[0], bool)
  for t in range(seqs.shape[1]):
    lp = np.asarray(jax.nn.log_softmax(logits))
    total += np.where(done, 0.0, lp[np.arange(len(seqs)), seqs[:, t]])
    done |= seqs[:, t] == end_id
    carry, logits = model.apply(variables, carry, jnp.asarray(seqs[:, t]), method='step')
  return total


@pytest.mark.parametrize('t_max', [2, 3])
def test_wide_beam_finds_the_most_likely_sequence_exactly(model_and_vars, t_max):
  """With beam >= V^(T-1) the search is exhaustive: it must match brute force."""
  model, variables, images, _ = model_and_vars
  end = 2
  f = model.apply(variables, images[:1], method='encode')
  best = decoding.beam_search(model.apply, variables, f, beam_size=V ** (t_max - 1),
                              max_len=t_max, end_id=end, alpha=0.0)
  # Every sequence in canonical form (only <pad> after <end>), scored by brute force.
  def canonical(s):
    return all(s[i + 1] == 0 for i in range(t_max - 1) if end in s[:i + 1])
  seqs = np.array([s for s in np.ndindex(*(V,) * t_max) if canonical(s)])
  scores = _sequence_logprob(model, variables, jnp.repeat(f, len(seqs), 0), seqs, end)
  got = _sequence_logprob(model, variables, f, np.asarray(best), end)
  np.testing.assert_allclose(got[0], scores.max(), rtol=1e-5)


def test_decoders_pad_after_end():
  seqs = np.array([[5, 2, 0, 0], [5, 6, 7, 2]])
  # The invariant both decoders promise, checked on real output below.
  model = Captioner(cnn.CaptionEncoderTiny(), decoder.InjectDecoder(V, 8, 16))
  images = jnp.zeros((8, 16, 16, 3), jnp.uint8)
  variables = model.init(jax.random.key(3), images, jnp.zeros((8, L), jnp.int32))
  # Bias the output so <end> (2) is likely early and then check padding.
  variables = jax.tree_util.tree_map_with_path(
      lambda p, x: x.at[2].add(3.0) if 'out' in str(p) and 'bias' in str(p) else x, variables)
  for method in ('greedy', 'beam'):
    out = np.asarray(decoding.make_captioner_fn(model, method=method, max_len=L, end_id=2,
                                                beam_size=3)(variables, images))
    for row in out:
      ends = np.nonzero(row == 2)[0]
      assert len(ends) >= 1, row
      assert np.all(row[ends[0] + 1:] == 0), row
  del seqs


def _tiny_state(vocab_size=V):
  model = Captioner(cnn.CaptionEncoderTiny(), decoder.InjectDecoder(vocab_size, 8, 16))
  images = jnp.asarray(np.arange(2 * 16 * 16 * 3).reshape(2, 16, 16, 3) % 251, jnp.uint8)
  tokens = jnp.asarray([[1, 4, 5, 6, 2, 0, 0, 0, 0], [1, 7, 8, 2, 0, 0, 0, 0, 0]], jnp.int32)
  state = state_lib.create(model, optax.adamw(1e-2), jax.random.key(0), images, tokens)
  return state, {'image': images, 'tokens': tokens}


def test_initial_loss_is_near_log_vocab_size():
  state, batch = _tiny_state()
  _, metrics = jax.jit(steps.caption_train_step)(state, batch, jax.random.key(0))
  assert abs(float(metrics['loss']) - np.log(V)) < 0.3


def test_train_step_golden_value():
  state, batch = _tiny_state()
  step = jax.jit(steps.caption_train_step)
  losses = []
  for _ in range(3):
    state, metrics = step(state, batch, jax.random.key(0))
    losses.append(float(metrics['loss']))
  # Recorded from this implementation (f32, CPU); a change here means the maths changed.
  np.testing.assert_allclose(losses, GOLDEN_LOSSES, rtol=2e-4)
  assert int(state.step) == 3


def test_padding_does_not_change_the_loss():
  state, batch = _tiny_state()
  step = jax.jit(steps.caption_train_step)
  _, m1 = step(state, batch, jax.random.key(0))
  longer = {**batch, 'tokens': jnp.pad(batch['tokens'], ((0, 0), (0, 4)))}
  s2 = state_lib.create(state.apply_fn.__self__, optax.adamw(1e-2), jax.random.key(0),
                        batch['image'], longer['tokens'])
  _, m2 = step(s2, longer, jax.random.key(0))
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  np.testing.assert_allclose(m1['token_accuracy'], m2['token_accuracy'], rtol=1e-5)


GOLDEN_LOSSES = [2.405520, 2.338135, 2.271684]


def test_attention_maps_of_a_batch_match_each_example_alone():
  """The plots decode several images at once; each must get exactly its own words and maps."""
  model, variables, images, _ = _model_and_inputs('attention_current')
  variables = _with_random_coverage_scale(variables)
  vocab = Vocabulary.build([' '.join(f'w{i}' for i in range(V - 4))])
  features = model.apply(variables, images, method='encode')
  batch = caption_eval.attention_maps(model, variables, features, vocab, L - 1)
  assert len(batch) == images.shape[0]
  for k, (words, maps) in enumerate(batch):
    alone_words, alone_maps = caption_eval.attention_maps(model, variables, features[k:k + 1],
                                                          vocab, L - 1)[0]
    assert words == alone_words
    assert maps.shape == (len(words), features.shape[1] * features.shape[2])
    np.testing.assert_allclose(maps, alone_maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_argmax_last_equals_argmax_ties_included(dtype):
  x = jax.random.normal(jax.random.key(0), (4, 6, 300)).astype(dtype)
  # Ties: a repeated maximum (argmax takes its first index), all-equal rows, -inf entries.
  x = x.at[0, 0, 7].set(9.0).at[0, 0, 250].set(9.0).at[1].set(0.5).at[2, :, ::2].set(-jnp.inf)
  np.testing.assert_array_equal(decoding.argmax_last(x), jnp.argmax(x, -1))
  assert decoding.argmax_last(x)[0, 0] == 7 and (decoding.argmax_last(x)[1] == 0).all()
