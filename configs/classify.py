"""Classification: `launch.py --config=configs/classify.py[:k=v,...] --workdir=DIR`.

Arguments:
  dataset=  shapes30 (default: generated offline, 30 classes), tiny_imagenet30 (Tiny
            ImageNet-200 layout at --config.data_dir, classes from its wnids.txt or
            --config.tiny_imagenet.wnids), image_folder (root/<class>/<image> at
            --config.data_dir)
  model=    simple_cnn (the benchmark's SimpleCNN), resnet (ResNet-18 layout at half width,
            stem stride 2),
            cnn, residual_cnn (the two classes with the fields below), tiny_cnn, tiny_resnet
  runlocal  shrinks everything to a seconds-long smoke run

Each data set's default model and recipe come from the data set; model= replaces the model.
"""
import ml_collections

from capjax.configlib import parse_arg

# Each data set's default model (the recipes: docs/classification.md).
_DEFAULT_MODEL = {'shapes30': 'cnn', 'tiny_imagenet30': 'resnet', 'image_folder': 'resnet'}


def get_config(arg=None):
  arg = parse_arg(arg, dataset='shapes30', model='', runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'classify'
  c.seed = 0
  c.dataset = arg.dataset
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # Root of a real data set.
  c.tfds_dir = ml_collections.FieldReference(None, field_type=str)  # Prepared TFDS data; None: TFDS default.

  c.shapes30 = ml_collections.ConfigDict(dict(
      num_train=15000, num_validation=1500, num_test=3000, seed=0))
  # wnids: None for <data_dir>/wnids.txt, a path to a wnid file, or a comma-separated list.
  c.tiny_imagenet = ml_collections.ConfigDict(dict(
      wnids=ml_collections.FieldReference(None, field_type=str), train_per_class=450,
      val_per_class=50, skip_missing_images=False))
  c.image_folder = ml_collections.ConfigDict(dict(split_fractions=(0.8, 0.1, 0.1),
                                                  split_seed=0))
  # image_size: stored, trained and evaluated size. stats_max_images: images (evenly spaced
  # over the train split) that the normalisation statistics are computed from. in_memory:
  # hold the decoded splits in RAM (Tiny ImageNet30 at 64 px: ~200 MB); turn it off for
  # data sets larger than memory.
  # progressive_sizes: (start_fraction, size) pairs that train on smaller images early on
  # (see capjax.classify.pipeline.size_schedule); () trains at image_size throughout.
  c.data = ml_collections.ConfigDict(dict(image_size=64, num_threads=2,
                                          stats_max_images=20000, in_memory=True,
                                          progressive_sizes=()))
  # crop: 'pad' (random crop of the padded image), 'resized' (random-resized crop with
  # crop_scale of the area) or 'none'. mixup/cutmix: Beta(alpha, alpha); 0 turns them off.
  c.augment = ml_collections.ConfigDict(dict(
      crop='pad', crop_padding=4, crop_scale=(0.35, 1.0), flip=True, brightness=0.2,
      contrast=0.2, saturation=0.2, mixup_alpha=0.0, cutmix_alpha=0.0))

  # name: a preset of capjax.models.classifier.PRESETS. The other fields override the
  # preset where set (0 / () keep its value). conv: 'layers' (capjax.models.layers.Conv:
  # nn.Conv's values, computed the way measured fastest under the XLA flags in effect) or
  # 'flax' (nn.Conv). dtype: the compute dtype, 'float32' or 'bfloat16' (params, optimizer state
  # and loss stay float32; docs/mixed_precision.md).
  c.model = ml_collections.ConfigDict(dict(
      name=arg.model or _DEFAULT_MODEL.get(arg.dataset, 'simple_cnn'), widths=(),
      convs_per_stage=0, stage_sizes=(), stem_width=0, stem_stride=0, dropout=0.0,
      dtype='float32', conv='layers'))

  # The base recipe (1,000 steps of 128 at 64 px) is for image folders; Tiny ImageNet30 trains
  # longer on smaller images (below; docs/classification.md, 'Tiny ImageNet30 recipe and
  # result').
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, epochs=0.0, batch_size=128, label_smoothing=0.1, log_every=50,
      eval_every=250, checkpoint_every=250, keep_checkpoints=2,
      nan_policy='stop'))  # NaN/Inf loss or gradients: 'stop' the run, or 'skip' the step.
  c.optim = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, warmup_steps=200, final_lr_fraction=0.0,
      weight_decay=5e-4, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=0.0))
  # flip_average: average the logits of each image and its mirror image (validation, test
  # and predict); for models trained with augment.flip.
  c.eval = ml_collections.ConfigDict(dict(split='test', batch_size=250, flip_average=False))

  if arg.dataset == 'shapes30':
    # Small images and a narrow CNN: >= 95% test accuracy within minutes on 2 CPU cores.
    c.data.image_size = 32
    c.augment.update(crop_padding=2, brightness=0.1, contrast=0.1, saturation=0.1)
    if not arg.model:
      c.model.widths = (16, 32, 64, 128)
    # 900 steps: nearly a 1,200-step schedule's accuracy (docs/classification.md, 'The shapes30
    # default').
    c.train.update(steps=900, batch_size=64, eval_every=300, checkpoint_every=300)
    c.optim.update(name='adamw', learning_rate=3e-3, warmup_steps=50,
                   final_lr_fraction=0.02, weight_decay=1e-4)
  elif arg.dataset == 'tiny_imagenet30':
    # Progressive resizing (half the run at 40 px, a third of a 64 px step's time, then 48, 56,
    # and the last 15% at 64) and flip-averaged evaluation (docs/classification.md, 'Tiny
    # ImageNet30 recipe and result').
    c.data.progressive_sizes = ((0.0, 40), (0.5, 48), (0.7, 56), (0.85, 64))
    c.train.update(steps=2200, eval_every=550, checkpoint_every=550)
    c.eval.flip_average = True
  elif arg.dataset != 'image_folder':
    from capjax.errors import UserError
    raise UserError(f"configs/classify.py: dataset={arg.dataset!r} is unknown; use shapes30, "
                    f"tiny_imagenet30 or image_folder.")

  if arg.runlocal:
    c.shapes30.update(num_train=300, num_validation=60, num_test=60)
    c.data.update(image_size=16, num_threads=1)
    if not arg.model:
      c.model.update(name='tiny_cnn', widths=())
    c.train.update(steps=12, batch_size=16, log_every=4, eval_every=6, checkpoint_every=6)
    c.optim.update(warmup_steps=2)
    c.eval.update(batch_size=32)
  return c
