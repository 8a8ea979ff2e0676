"""Vocabulary: specials, frequency cut, encode/decode, JSON round trip."""
import numpy as np
import pytest

from capjax.data.tokenizer import normalize, Vocabulary


def test_normalize_lowercases_and_strips_punctuation():
  assert normalize("A Dog's ball, on the GRASS!") == ['a', "dog's", 'ball', 'on', 'the', 'grass']


def test_build_keeps_frequent_words_after_specials():
  vocab = Vocabulary.build(['a dog runs', 'a dog sits', 'a cat'], min_freq=2)
  assert vocab.words == ['<pad>', '<start>', '<end>', '<unk>', 'a', 'dog']
  assert (vocab.pad_id, vocab.start_id, vocab.end_id, vocab.unk_id) == (0, 1, 2, 3)


def test_encode_pads_marks_unknown_and_keeps_end_when_cut():
  vocab = Vocabulary.build(['a dog runs'])
  np.testing.assert_array_equal(vocab.encode('A dog flies', 7), [1, 4, 5, 3, 2, 0, 0])
  cut = vocab.encode('a dog runs a dog runs', 5)
  assert list(cut) == [1, 4, 5, 6, 2]
  assert vocab.decode(cut) == 'a dog runs'


def test_decode_stops_at_end():
  vocab = Vocabulary.build(['a dog'])
  assert vocab.decode([4, 5, 2, 4, 4]) == 'a dog'


def test_save_load_round_trip(tmp_path):
  vocab = Vocabulary.build(['the red ball', 'the blue ball'])
  vocab.save(tmp_path / 'vocab.json')
  assert Vocabulary.load(tmp_path / 'vocab.json').words == vocab.words


def test_load_rejects_foreign_json(tmp_path):
  (tmp_path / 'v.json').write_text('{"words": ["a", "b"]}')
  with pytest.raises(ValueError, match='not a capjax vocabulary'):
    Vocabulary.load(tmp_path / 'v.json')
