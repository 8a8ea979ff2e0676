"""Classification metrics against hand-computed values (no sklearn)."""
import json

import numpy as np
import pytest

from capjax.metrics import classification as cls


def _pairwise_auc(scores, positives):
  """AUC by definition: P(score+ > score-) + 0.5 P(tie), over all positive/negative pairs."""
  pos, neg = scores[positives], scores[~positives]
  diff = pos[:, None] - neg[None, :]
  return float(np.mean((diff > 0) + 0.5 * (diff == 0)))


def test_confusion_matrix_3_classes_matches_hand_count():
  labels = [0, 0, 1, 1, 1, 2, 2, 0]
  preds = [0, 1, 1, 1, 2, 2, 0, 0]
  cm = cls.confusion_matrix(labels, preds, 3)
  np.testing.assert_array_equal(cm, [[2, 1, 0], [0, 2, 1], [1, 0, 1]])
  np.testing.assert_allclose(cls.per_class_accuracy(cm), [2 / 3, 2 / 3, 1 / 2])


def test_per_class_accuracy_is_nan_for_class_without_examples():
  cm = cls.confusion_matrix([0, 0], [0, 1], 3)
  acc = cls.per_class_accuracy(cm)
  assert acc[0] == 0.5 and np.isnan(acc[1]) and np.isnan(acc[2])


def test_confusion_matrix_rejects_out_of_range_labels():
  with pytest.raises(ValueError, match='labels'):
    cls.confusion_matrix([0, 3], [0, 1], 3)


def test_topk_accuracy_hand_example():
  scores = np.array([[0.1, 0.7, 0.2],   # true 1: rank 0
                     [0.5, 0.3, 0.2],   # true 2: rank 2
                     [0.2, 0.5, 0.3]])  # true 2: rank 1
  labels = np.array([1, 2, 2])
  assert cls.topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
  assert cls.topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
  assert cls.topk_accuracy(scores, labels, 3) == 1.0
  assert cls.topk_accuracy(scores, labels, 10) == 1.0


def test_topk_accuracy_breaks_ties_like_argmax():
  scores = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]])
  # argmax picks class 0 for both rows, so only the first example counts as top-1 correct.
  assert cls.topk_accuracy(scores, [0, 1], 1) == 0.5
  assert cls.topk_accuracy(scores, [0, 1], 2) == 1.0


def test_roc_curve_matches_sklearn_docstring_example():
  fpr, tpr, thr = cls.roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
  np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
  np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
  np.testing.assert_allclose(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
  assert cls.auc(fpr, tpr) == pytest.approx(0.75)


def test_tied_positive_and_negative_contribute_half():
  fpr, tpr, _ = cls.roc_curve([0.5, 0.5], [0, 1])
  np.testing.assert_allclose(fpr, [0, 1])
  np.testing.assert_allclose(tpr, [0, 1])
  assert cls.auc(fpr, tpr) == 0.5
  # One tie among 4 pairs, the rest ordered correctly: (3 + 0.5) / 4.
  fpr, tpr, _ = cls.roc_curve([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0])
  assert cls.auc(fpr, tpr) == pytest.approx(3.5 / 4)


def test_perfect_and_reversed_ranking_give_1_and_0():
  assert cls.auc(*cls.roc_curve([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])[:2]) == 1.0
  assert cls.auc(*cls.roc_curve([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])[:2]) == 0.0


@pytest.mark.parametrize('drop_intermediate', [True, False])
def test_auc_equals_pairwise_definition_on_random_scores_with_ties(drop_intermediate):
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 20, size=300) / 20.0  # many ties
  positives = rng.random(300) < 0.3
  fpr, tpr, thr = cls.roc_curve(scores, positives, drop_intermediate=drop_intermediate)
  assert np.all(np.diff(thr) < 0) and np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
  assert cls.auc(fpr, tpr) == pytest.approx(_pairwise_auc(scores, positives))


def test_roc_curve_without_positives_is_nan():
  fpr, tpr, _ = cls.roc_curve([0.1, 0.2], [0, 0])
  assert np.isnan(tpr).all() and np.isnan(cls.auc(fpr, tpr))


def test_roc_auc_summary_per_class_micro_macro_and_skips_absent_class():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(200, 4))
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  labels = rng.integers(0, 3, size=200)  # class 3 never appears
  labels[:50] = probs[:50, :3].argmax(axis=1)  # some signal, so AUCs differ from 0.5
  out = cls.roc_auc_summary(probs, labels, ['a', 'b', 'c', 'd'])
  assert out['skipped_classes'] == ['d']
  assert set(out['per_class_auc']) == {'a', 'b', 'c'}
  for c, name in enumerate('abc'):
    assert out['per_class_auc'][name] == pytest.approx(_pairwise_auc(probs[:, c], labels == c))
  assert out['macro_auc'] == pytest.approx(np.mean(list(out['per_class_auc'].values())))
  onehot = labels[:, None] == np.arange(4)[None, :]
  assert out['micro_auc'] == pytest.approx(_pairwise_auc(probs.ravel(), onehot.ravel()))
  curves = cls.roc_curves(probs, labels, ['a', 'b', 'c', 'd'])
  assert set(curves) == {'a', 'b', 'c', 'micro', 'macro'}
  for name, (fpr, tpr) in curves.items():
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == pytest.approx(1), name
  ovr = cls.roc_curve_ovr(probs, labels)
  assert len(ovr) == 4 and np.isnan(ovr[3][1]).all()


def test_roc_rejects_logits_with_a_clear_message():
  with pytest.raises(ValueError, match='softmax'):
    cls.roc_auc_summary(np.array([[2.0, -1.0], [0.5, 0.2]]), [0, 1])


def test_classification_report_keys_and_values_are_json_ready():
  probs = np.array([[0.7, 0.2, 0.1],
                    [0.2, 0.5, 0.3],
                    [0.1, 0.3, 0.6],
                    [0.6, 0.3, 0.1]])
  labels = np.array([0, 1, 1, 0])  # class 'z' absent
  report = cls.classification_report(probs, labels, ['x', 'y', 'z'])
  assert report['num_examples'] == 4
  assert report['top1_accuracy'] == 0.75
  assert report['top5_accuracy'] == 1.0
  assert report['class_accuracy/x'] == 1.0 and report['class_accuracy/y'] == 0.5
  assert 'class_accuracy/z' not in report and report['auc_skipped_classes'] == 1
  assert report['mean_class_accuracy'] == 0.75
  assert report['class_auc/x'] == 1.0
  # y-scores: positives {0.5, 0.3} vs negatives {0.2, 0.3}: 3 wins and 1 tie out of 4 pairs.
  assert report['class_auc/y'] == pytest.approx(3.5 / 4)
  assert report['macro_auc'] == pytest.approx((1.0 + 3.5 / 4) / 2)
  json.dumps(report, allow_nan=False)


def test_roc_auc_summary_golden_tiny_case():
  # Hand-computed golden values. These metrics stay in numpy rather than sklearn: they match
  # sklearn 1.9.1 exactly, but sklearn adds ~60 MB and ~0.8 s of import to replace ~18 lines, and
  # its top_k_accuracy_score breaks ties toward the higher class index, which disagrees with argmax.
  probs = np.array([[0.6, 0.3, 0.1],
                    [0.2, 0.5, 0.3],
                    [0.3, 0.3, 0.4]])
  labels = np.array([0, 1, 1])  # class 2 absent
  out = cls.roc_auc_summary(probs, labels)
  assert out['skipped_classes'] == ['2']
  # Class 0: the positive 0.6 beats both negatives {0.2, 0.3}.
  assert out['per_class_auc']['0'] == 1.0
  # Class 1: positives {0.5, 0.3} vs negative {0.3}: one win and one tie out of 2 pairs.
  assert out['per_class_auc']['1'] == 0.75
  assert out['macro_auc'] == 0.875
  # Micro: positives {0.6, 0.5, 0.3} vs negatives {0.3, 0.1, 0.2, 0.3, 0.3, 0.4}:
  # 0.6 and 0.5 beat all 6; 0.3 has 2 wins and 3 ties: 6 + 6 + 3.5 = 15.5 out of 18 pairs.
  assert out['micro_auc'] == pytest.approx(15.5 / 18, abs=1e-12)
