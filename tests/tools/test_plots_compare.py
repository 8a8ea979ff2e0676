"""Every figure writes a PNG of the expected size; compare builds the right table from workdirs."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from helpers import runs as rh
from capjax.metrics import classification as cls
from capjax.tools import compare, plots


def _png_size(path):
  assert os.path.getsize(path) > 1000, path
  with Image.open(path) as image:
    assert image.format == 'PNG'
    return image.size


def test_plot_curves_writes_png(tmp_path):
  history = {'train/loss': [(s, 1 / (s + 1)) for s in range(0, 100, 5)],
             'eval/loss': [(0, 1.0), (50, 0.2)],
             'train/accuracy': [(s, s / 100) for s in range(0, 100, 5)],
             'eval_accuracy': [(0, 0.1), (50, 0.4)]}
  path = plots.plot_curves(history, str(tmp_path / 'curves.png'), 'run')
  assert path == str(tmp_path / 'curves.png')
  assert _png_size(path) == (1000, 360)  # two panels: loss and accuracy


def test_split_key_groups_train_and_validation_series():
  assert plots._split_key('train/loss') == ('loss', 'train')
  assert plots._split_key('eval_token_accuracy') == ('token_accuracy', 'validation')
  assert plots._split_key('learning_rate') == ('learning_rate', 'learning_rate')


@pytest.mark.parametrize('num_classes,normalize', [(3, True), (30, False)])
def test_plot_confusion_matrix_scales_with_classes(tmp_path, num_classes, normalize):
  rng = np.random.default_rng(0)
  cm = cls.confusion_matrix(rng.integers(0, num_classes, 300), rng.integers(0, num_classes, 300),
                            num_classes)
  names = [f'class_{i:02d}_name' for i in range(num_classes)]
  width, height = _png_size(plots.plot_confusion_matrix(cm, names, str(tmp_path / 'cm.png'),
                                                        normalize=normalize))
  assert 600 <= height <= 2400 and width > height
  if num_classes == 30:
    assert height >= 1200  # ~0.3 inch per class keeps 30 names legible


def test_plot_roc_writes_png_for_few_and_many_classes(tmp_path):
  rng = np.random.default_rng(0)
  for num_classes in (3, 30):
    labels = rng.integers(0, num_classes, 400)
    logits = rng.normal(size=(400, num_classes))
    logits[np.arange(400), labels] += 1.5
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    curves = cls.roc_curves(probs, labels)
    path = str(tmp_path / f'roc{num_classes}.png')
    assert _png_size(plots.plot_roc(curves, path)) == (700, 600)


def test_plot_caption_samples_grid(tmp_path):
  images = [np.full((48 + 8 * i, 64, 3), 40 * i, np.uint8) for i in range(5)]
  generated = ['a dog runs ' * 20] + ['a cat'] * 4  # the long one is wrapped and cut
  references = [['a reference', 'another reference ' * 6, 'a third, not drawn']] * 4 + ['one']
  path = plots.plot_caption_samples(images, generated, references,
                                    str(tmp_path / 'samples.png'), ncols=4)
  # 4 columns of 3.6 in; 2 rows of a 3 in image + 7 lines of 9 pt text (3 generated, 2 + 2
  # references) at 1.3 line spacing + 0.1 in.
  assert _png_size(path) == (1440, int(2 * (3.0 + 7 * 1.3 * 9 / 72 + 0.1) * 100))
  with pytest.raises(ValueError, match='same'):
    plots.plot_caption_samples(images, generated[:2], ['x'] * 5, str(tmp_path / 'bad.png'))


def test_plot_attention_one_panel_per_word_plus_input(tmp_path):
  image = np.random.default_rng(0).random((96, 128, 3))
  words = ['a', 'dog', 'on', 'grass']
  maps = np.random.default_rng(1).random((4, 7, 7))
  width, height = _png_size(plots.plot_attention(image, words, maps, str(tmp_path / 'att.png')))
  assert (width, height) == (1200, 260)  # 5 panels in one row
  with pytest.raises(ValueError, match='per word'):
    plots.plot_attention(image, words[:2], maps, str(tmp_path / 'bad.png'))


def test_plot_bars_tolerates_missing_values(tmp_path):
  rows = [{'workdir': 'a', 'bleu_1': 0.5, 'cider': 0.7}, {'workdir': 'b', 'bleu_1': 0.6}]
  width, height = _png_size(plots.plot_bars(rows, ['bleu_1', 'cider'], str(tmp_path / 'b.png')))
  assert width >= 600 and height == 480


def test_plots_never_import_pyplot(tmp_path):
  # Without pyplot there is no global figure registry to leak into or backend to switch.
  code = ('import sys; from capjax.tools import plots; '
          f"plots.plot_bars([{{'workdir': 'a', 'x': 1.0}}], ['x'], {str(tmp_path / 'b.png')!r}); "
          "print('matplotlib.pyplot' in sys.modules)")
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=rh.ROOT, check=True)
  assert result.stdout.strip() == 'False'


def _fake_workdir(root, name, run, metrics):
  workdir = root / name
  workdir.mkdir()
  (workdir / 'run.json').write_text(json.dumps(run))
  if metrics is not None:
    (workdir / 'eval.json').write_text(json.dumps(metrics))
  return str(workdir)


def _two_workdirs(tmp_path):
  cap = _fake_workdir(tmp_path, 'cap_resnet', {
      'task': 'caption', 'model': 'resnet50_lstm', 'num_params': 25_600_000,
      'train_time_s': 3725.0, 'dataset': 'flickr8k', 'seed': 0,
  }, {'bleu_1': 0.61, 'bleu_2': 0.42, 'bleu_3': 0.28, 'bleu_4': 0.18, 'cider': 0.45,
      'rouge_l': 0.44, 'token_accuracy': 0.39, 'loss': 2.91, 'meteor': 0.19,
      'cosine_similarity': 0.55, 'other': 5, 'decoding': 'beam'})
  clf = _fake_workdir(tmp_path, 'clf_cnn', {
      'task': 'classify', 'model': 'cnn', 'num_params': 1200, 'train_time_s': 42.5,
      'dataset': 'shapes',
  }, {'top1_accuracy': 0.9, 'top5_accuracy': 1.0, 'loss': 0.31, 'macro_auc': 0.97,
      'micro_auc': 0.98, 'class_accuracy/circle': 0.8})
  return cap, clf


def test_compare_writes_md_csv_png_with_mixed_tasks(tmp_path):
  cap, clf = _two_workdirs(tmp_path)
  prefix = str(tmp_path / 'out' / 'cmp')
  rows = compare.compare_workdirs([cap, clf], prefix)
  assert [r['workdir'] for r in rows] == ['cap_resnet', 'clf_cnn']
  expected_columns = ['workdir', 'task', 'dataset', 'model', 'num_params', 'train_time_s',
                      'top1_accuracy', 'top5_accuracy', 'loss', 'macro_auc', 'micro_auc',
                      'bleu_1', 'bleu_2', 'bleu_3', 'bleu_4', 'cider', 'rouge_l',
                      'token_accuracy', 'meteor', 'cosine_similarity']
  assert list(rows[0]) == expected_columns
  assert rows[0]['cider'] == 0.45 and rows[0]['top1_accuracy'] is None
  assert rows[1]['num_params'] == 1200 and rows[1]['loss'] == 0.31 and rows[1]['bleu_4'] is None

  with open(prefix + '.csv') as f:
    csv_rows = list(csv.DictReader(f))
  assert list(csv_rows[0]) == expected_columns
  assert csv_rows[0]['model'] == 'resnet50_lstm' and csv_rows[0]['meteor'] == '0.19'
  assert csv_rows[0]['top1_accuracy'] == '' and csv_rows[1]['micro_auc'] == '0.98'

  md = open(prefix + '.md').read().splitlines()
  assert len(md) == 4 and md[0].startswith('| workdir | task | dataset | model | parameters |')
  cells = [c.strip() for c in md[2].strip('|').split('|')]
  assert cells[:6] == ['cap_resnet', 'caption', 'flickr8k', 'resnet50_lstm', '25.60M', '1h 02m']
  assert cells[expected_columns.index('bleu_4')] == '0.1800'
  assert cells[expected_columns.index('top1_accuracy')] == ''
  clf_cells = [c.strip() for c in md[3].strip('|').split('|')]
  assert clf_cells[4:6] == ['1.20K', '42.5s']
  assert _png_size(prefix + '.png')[1] == 480


def test_compare_single_task_shows_only_its_metrics_and_no_absent_optional_ones(tmp_path):
  cap = _fake_workdir(tmp_path, 'a', {'task': 'caption', 'model': 'm', 'num_params': 1,
                                      'train_time_s': 1.0, 'dataset': 'd'}, {'bleu_1': 0.5})
  rows = compare.compare_workdirs([cap], str(tmp_path / 'c'))
  assert 'top1_accuracy' not in rows[0] and rows[0]['bleu_1'] == 0.5
  assert 'meteor' not in rows[0] and 'cosine_similarity' not in rows[0]


def test_compare_missing_or_invalid_eval_json_says_what_to_do(tmp_path):
  missing = _fake_workdir(tmp_path, 'missing', {'task': 'caption'}, None)
  with pytest.raises(ValueError, match=r'eval\.json does not exist; run evaluation for'):
    compare.compare_workdirs([missing], str(tmp_path / 'c'))
  broken = _fake_workdir(tmp_path, 'broken', {'task': 'caption'}, None)
  (tmp_path / 'broken' / 'eval.json').write_text('{not json')
  with pytest.raises(ValueError, match=r'eval\.json is not readable JSON.*run evaluation'):
    compare.compare_workdirs([broken], str(tmp_path / 'c'))


def test_compare_cli_prints_table_and_reports_errors_without_traceback(tmp_path):
  cap, clf = _two_workdirs(tmp_path)
  prefix = str(tmp_path / 'cli')
  assert compare.main([f'--out={prefix}', cap, clf]) == 0
  assert os.path.exists(prefix + '.md') and os.path.exists(prefix + '.png')
  result = subprocess.run([sys.executable, '-m', 'capjax.tools.compare', f'--out={prefix}',
                           str(tmp_path / 'nope')], capture_output=True, text=True,
                          cwd=rh.ROOT)
  assert result.returncode == 2
  assert 'eval.json does not exist' in result.stderr and 'Traceback' not in result.stderr
