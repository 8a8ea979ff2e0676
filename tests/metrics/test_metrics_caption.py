"""Caption metrics: hand-computed BLEU/ROUGE-L, TF-IDF cosine, and METEOR's failure handling."""
import logging
import math
import os
import shutil
import time

import pytest

from capjax.metrics import caption

REF = 'the cat sat on the mat'


def test_tokenize_lowercases_and_drops_punctuation():
  assert caption.tokenize("A man's T-shirt,  RED.\n") == 'a man s t shirt red'
  assert caption.tokenize('...') == ''


def test_identical_captions_score_perfectly(capsys):
  # Every caption has >= 4 words: a caption without 4-grams has a zero CIDEr 4-gram vector.
  refs = {i: [s] for i, s in enumerate(['a dog runs on grass', 'two cats sleep inside', REF])}
  hyps = {i: r[0] for i, r in refs.items()}
  out = caption.caption_metrics(refs, hyps, meteor=False)
  for n in range(1, 5):
    assert out[f'bleu_{n}'] == pytest.approx(1.0, abs=1e-6)
  assert out['rouge_l'] == pytest.approx(1.0)
  assert out['cider'] == pytest.approx(10.0)  # CIDEr-D is scaled by 10
  assert 'meteor' not in out
  assert capsys.readouterr().out == ''  # pycocoevalcap's prints are silenced


def test_disjoint_captions_score_zero():
  refs = {0: ['a dog runs on grass'], 1: ['two cats sleep inside']}
  hyps = {0: 'blue sky above mountains', 1: 'yellow car parked'}
  out = caption.caption_metrics(refs, hyps, meteor=False)
  for key in ('bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'rouge_l', 'cider'):
    assert out[key] == pytest.approx(0.0, abs=1e-6), key


def test_bleu_and_rouge_match_hand_computation():
  # Clipped n-gram precisions of "the cat sat on a mat": 5/6, 3/5, 2/4, 1/3; same length, BP = 1.
  out = caption.caption_metrics({'x': [REF]}, {'x': 'The cat sat on a mat.'}, meteor=False)
  p = [5 / 6, 3 / 5, 2 / 4, 1 / 3]
  for n in range(1, 5):
    assert out[f'bleu_{n}'] == pytest.approx(math.prod(p[:n]) ** (1 / n), rel=1e-6)
  # LCS "the cat sat on mat" = 5 of 6 tokens either way, so the F-measure is 5/6.
  assert out['rouge_l'] == pytest.approx(5 / 6)


def test_bleu_brevity_penalty_for_short_hypothesis():
  out = caption.caption_metrics({'x': [REF, 'a cat on a mat']}, {'x': 'the cat'}, meteor=False)
  # Closest reference length is 5 (not 6): BP = exp(1 - 5/2); unigram/bigram precision are 1.
  assert out['bleu_1'] == pytest.approx(math.exp(1 - 5 / 2), rel=1e-6)
  assert out['bleu_2'] == pytest.approx(math.exp(1 - 5 / 2), rel=1e-6)
  # No 3-gram exists; pycocoevalcap smooths 0/0 as 1e-15/1e-9, so the score is tiny, not 0.
  assert out['bleu_3'] < 0.01


def test_references_beyond_hypotheses_are_ignored_but_missing_ones_raise():
  refs = {0: ['a dog'], 1: ['a cat']}
  assert caption.caption_metrics(refs, {0: 'a dog'}, meteor=False)['bleu_1'] == pytest.approx(1.0)
  with pytest.raises(ValueError, match='no references'):
    caption.caption_metrics(refs, {2: 'a dog'}, meteor=False)
  with pytest.raises(ValueError, match='non-empty list'):
    caption.caption_metrics({0: []}, {0: 'a dog'}, meteor=False)


def test_cosine_similarity_identical_disjoint_and_hand_value():
  refs = {0: ['A dog runs.', 'a dog running'], 1: ['two cats']}
  assert caption.cosine_similarity(refs, {0: 'a dog runs', 1: 'two cats'}) < 1.0  # 2nd ref differs
  same = {0: ['a dog runs'], 1: ['two cats']}
  assert caption.cosine_similarity(same, {0: 'A dog runs!', 1: 'Two cats'}) == pytest.approx(1.0)
  assert caption.cosine_similarity(same, {0: 'blue sky', 1: 'red car'}) == 0.0
  # One image: idf(a) = idf(b) = ln(2/2) + 1 = 1, idf(c) = ln(2/1) + 1 (c is in no reference).
  idf_c = math.log(2) + 1
  expected = 1 / (math.sqrt(1 + idf_c**2) * math.sqrt(2))
  assert caption.cosine_similarity({0: ['a b']}, {0: 'a c'}) == pytest.approx(expected)
  assert caption.cosine_similarity({0: ['a b']}, {0: '!!'}) == 0.0  # empty hypothesis


def _fake_java(tmp_path, body):
  path = tmp_path / 'java'
  path.write_text('#!/bin/sh\n' + body + '\n')
  path.chmod(0o755)
  return str(path)


def test_meteor_failure_is_logged_and_omitted(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(shutil, 'which', lambda _: _fake_java(tmp_path, 'echo boom >&2; exit 3'))
  with caplog.at_level(logging.WARNING):
    out = caption.caption_metrics({0: ['a dog']}, {0: 'a dog'}, meteor=True)
  assert 'meteor' not in out and out['bleu_1'] == pytest.approx(1.0)
  assert 'METEOR skipped' in caplog.text and 'boom' in caplog.text


def test_meteor_hang_is_killed_after_timeout(tmp_path, monkeypatch, caplog):
  # exec: the sleeping process is the one killed, so its stdout really closes.
  monkeypatch.setattr(shutil, 'which', lambda _: _fake_java(tmp_path, 'exec sleep 60'))
  start = time.monotonic()
  with caplog.at_level(logging.WARNING):
    out = caption.caption_metrics({0: ['a dog']}, {0: 'a dog'}, meteor_timeout_s=0.5)
  assert time.monotonic() - start < 10
  assert 'meteor' not in out and 'longer than' in caplog.text


def test_meteor_without_java_is_omitted(monkeypatch):
  monkeypatch.setattr(shutil, 'which', lambda _: None)
  assert 'meteor' not in caption.caption_metrics({0: ['a dog']}, {0: 'a dog'})


@pytest.mark.skipif(shutil.which('java') is None or os.environ.get('CAPJAX_SKIP_METEOR') == '1',
                    reason='needs Java; takes ~10 s (set CAPJAX_SKIP_METEOR=1 to skip)')
def test_meteor_with_real_jar_is_near_1_for_identical_captions():
  # One call only: each call starts a JVM that loads a 60 MB paraphrase table (~8 s).
  refs = {0: ['a dog runs on the grass'], 1: ['two cats sleep on a red sofa']}
  out = caption.caption_metrics(refs, {0: 'A dog runs on the grass.', 1: refs[1][0]})
  assert out['meteor'] > 0.95  # below 1 only by METEOR's fragmentation penalty


def test_caption_diversity_counts_captions_and_pooled_ngrams():
  from capjax.metrics.diversity import caption_diversity
  hyps = {0: 'a dog runs', 1: 'a dog runs', 2: 'a cat sits', 3: 'a dog'}
  out = caption_diversity(hyps)
  assert out['distinct_captions'] == 3
  assert out['most_common_caption'] == 'a dog runs' and out['most_common_caption_count'] == 2
  # Words: 11 in all, distinct {a, dog, runs, cat, sits}; bigrams: 7, distinct 4.
  assert out['distinct_1'] == pytest.approx(5 / 11)
  assert out['distinct_2'] == pytest.approx(4 / 7)
  assert caption_diversity([])['distinct_captions'] == 0
