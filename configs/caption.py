"""Captioning: `launch.py --config=configs/caption.py[:k=v,...] --workdir=DIR`.

Arguments:
  dataset=  shapes (default: generated offline), flickr8k, coco, own (a real data set's root
            goes in --config.data_dir=PATH; see docs/captioning.md)
  encoder=  shapes_cnn (default for shapes), cnn (the same small CNN, trained from scratch;
            default for the real data sets), tiny_cnn, resnet50, xception (Keras layout;
            weights from --config.model.encoder_weights=FILE.h5, random init without),
            resnet_tiny (tests); --config.model.encoder_init=CLASSIFY_WORKDIR takes a
            trained capjax classifier's backbone instead
  decoder=  inject (Show and Tell: init-inject; par-inject with every_step), merge (the
            Keras seed's merge model; default with resnet50/xception), attention (Show,
            Attend and Tell; the default otherwise)
  runlocal  shrinks everything to a seconds-long smoke run

resnet50 and xception are frozen by default (config.optim.encoder_lr_scale=0): their features
are computed once into the HDF5 cache and only the decoder trains; a scale > 0 fine-tunes them
end to end at that fraction of the learning rate.
"""
import ml_collections

from capjax.configlib import parse_arg
# Names only (no JAX, no TFDS), so a mistyped flag fails at once.
from capjax.data.catalog import CAPTION_DATASETS as REAL_DATASETS
from capjax.models.catalog import INPUT_SIZE, KERAS_BACKBONES


def get_config(arg=None):
  arg = parse_arg(arg, dataset='shapes', encoder='', decoder='', runlocal=False)
  real = arg.dataset in REAL_DATASETS
  if arg.dataset != 'shapes' and not real:
    from capjax.errors import UserError
    raise UserError(f"configs/caption.py: dataset={arg.dataset!r} is unknown; use shapes, "
                    f"{', '.join(REAL_DATASETS)}.")
  arg.encoder = arg.encoder or ('cnn' if real else 'shapes_cnn')
  # Photos through a frozen Keras backbone: merge on pooled features (a compact cache); trained
  # from scratch: attention, the best measured on Flickr8k (docs/captioning.md).
  frozen = arg.encoder in KERAS_BACKBONES
  arg.decoder = arg.decoder or ('merge' if real and frozen else 'attention')
  c = ml_collections.ConfigDict()
  c.task = 'caption'
  c.seed = 0
  c.dataset = arg.dataset
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # Root of a real data set.
  # Prepared TFDS data; None: TFDS's default.
  c.tfds_dir = ml_collections.FieldReference(None, field_type=str)

  c.shapes = ml_collections.ConfigDict(dict(
      image_size=64, num_train=20000, num_validation=500, num_test=1000, seed=0))

  # Real data sets (reader options; the root is c.data_dir).
  c.flickr8k = ml_collections.ConfigDict(dict(kaggle_split_sizes=(6000, 1000)))
  c.coco = ml_collections.ConfigDict(dict(
      karpathy_file=ml_collections.FieldReference(None, field_type=str),
      year=ml_collections.FieldReference(None, field_type=str)))
  c.own = ml_collections.ConfigDict(dict(
      images_dir=ml_collections.FieldReference(None, field_type=str),  # None: c.data_dir.
      captions_file=ml_collections.FieldReference(None, field_type=str),  # Relative to data_dir.
      split_fractions=(0.8, 0.1, 0.1), split_seed=0))
  # Frozen-encoder feature cache (HDF5); None: <tfds_dir or ~/tensorflow_datasets>/capjax_features.
  c.features_dir = ml_collections.FieldReference(None, field_type=str)

  # image_size: the side images are fed at (shapes: linked to shapes.image_size).
  # skip_missing_images: drop (and count) listed images that are not on disk instead of failing.
  # in_memory: decode a real data set's images once into RAM (else in the grain map, per step).
  # flip: mirror training images left-right half of the time (not cached features).
  # crop_min_area: random resized crops of this fraction of the area up to all of it (1: none).
  c.data = ml_collections.ConfigDict(dict(
      caption_length=22, num_threads=2,
      image_size=INPUT_SIZE.get(arg.encoder, 128) if real else c.shapes.get_ref('image_size'),
      skip_missing_images=False, in_memory=True, flip=False, crop_min_area=1.0,
      feature_batch_size=32))
  c.vocab = ml_collections.ConfigDict(dict(min_freq=1, max_size=10000))

  # conv: 'flax' (nn.Conv) or 'layers' (capjax.models.layers.Conv, faster weight gradients on
  # small grids). score: attention scores, 'additive' (Bahdanau) or 'dot' (Luong). query: which
  # state attends, 'previous' (Show, Attend and Tell) or 'current' (Luong: after reading the word).
  # dtype: the compute dtype, 'float32' or 'bfloat16' (params, optimizer state, LSTM cell state
  # and loss stay float32; docs/mixed_precision.md). concept_weight: weight of the concept
  # head's loss (which words the image's captions use, from the pooled features; 0: no head).
  c.model = ml_collections.ConfigDict(dict(
      encoder=arg.encoder, decoder=arg.decoder, widths=(64, 64, 128, 128),
      strides=(1, 1, 2, 1), patch=4, norm=True, conv='flax',
      embed_dim=128, hidden=256, pool='flatten', every_step=True, dropout=0.0,
      attn_dim=128, score='additive', query='current', coverage=False, attention_reg=0.01,
      merge='add', feature_norm=False, dtype='float32', concept_weight=0.0,
      encoder_weights=ml_collections.FieldReference(None, field_type=str),  # Keras .h5 file.
      # A classify workdir whose trained backbone becomes the encoder (replacing model.encoder;
      # frozen with optim.encoder_lr_scale=0, else fine-tuned; docs/captioning.md).
      encoder_init=ml_collections.FieldReference(None, field_type=str)))

  # scst_steps: self-critical steps after the cross-entropy ones (0: none; see c.scst).
  # label_smoothing: of the cross-entropy steps' targets (the logged loss stays unsmoothed).
  c.train = ml_collections.ConfigDict(dict(
      steps=2400, epochs=0.0, batch_size=64, log_every=50, eval_every=400,
      checkpoint_every=400, keep_checkpoints=3, scst_steps=0, label_smoothing=0.0,
      nan_policy='stop'))  # NaN/Inf loss or gradients: 'stop' the run, or 'skip' the step.
  # Self-critical sequence training (docs/captioning.md, 'Self-critical training'): CIDEr-D of
  # num_samples sampled captions per image, minus a baseline: 'mean' of the image's other
  # samples (Luo 2020; better than 'greedy' in every model of ruotianluo's zoo) or 'greedy'
  # (Rennie 2017). bleu_weight adds that many times the sample's sentence BLEU-4 to its reward.
  # Its own constant learning rate and a fresh optimizer state. train_encoder=False keeps the
  # encoder as cross-entropy left it (no backward pass through it: a cheaper step).
  # crop_min_area: the random crops of its training images (None: data.crop_min_area's).
  c.scst = ml_collections.ConfigDict(dict(
      learning_rate=5e-5, num_samples=5, baseline='mean', bleu_weight=0.0, train_encoder=True,
      crop_min_area=ml_collections.FieldReference(None, field_type=float)))
  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=2e-3, warmup_steps=100, final_lr_fraction=0.02,
      weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=1.0,
      encoder_lr_scale=1.0))  # Encoder's learning rate / the decoder's; 0 freezes it.
  c.eval = ml_collections.ConfigDict(dict(
      split='test', batch_size=250, decoding='greedy', beam_size=3, length_alpha=0.6,
      meteor=True, num_samples=16, attention_plots=3))

  if real:
    _real_data_set(c, arg)
  else:
    _shapes_defaults(c)

  if arg.runlocal:
    c.shapes.update(image_size=32, num_train=256, num_validation=32, num_test=32)
    c.model.update(encoder='tiny_cnn', embed_dim=16, hidden=32)
    c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10,
                   checkpoint_every=10, scst_steps=0)
    c.eval.update(batch_size=16, meteor=False, num_samples=4, decoding='greedy')
    if real:
      c.data.update(image_size=32, in_memory=True, feature_batch_size=16)
      c.vocab.min_freq = 1
      c.eval.update(decoding='greedy', attention_plots=1)
  return c


def _shapes_defaults(c) -> None:
  """The embedded default, sized to train and evaluate in < 10 minutes on a 2-core CPU.

  Each choice below was measured (docs/captioning.md, 'The shapes default').
  """
  # No LayerNorm in the encoder (it kept the model from telling shapes apart); dot-product
  # attention scores, cheaper than additive ones on a CPU.
  c.model.update(norm=False, score='dot')
  # Coverage and no doubly stochastic penalty (which pulls attention onto the background) stop
  # the first object named in two-object scenes taking the other one's colour or shape.
  c.model.update(coverage=True, attention_reg=0.0)
  # <start> + the grammar's longest caption (17 words; tests/data/test_shapes.py checks it)
  # + <end>: no scan step is spent on padding every caption has.
  c.data.caption_length = 19
  # Batch 32 at twice the steps beat batch 64 in equal time; 1,800 steps (and the SCST ones
  # below) keep the whole command under 10 minutes.
  c.train.update(steps=1800, batch_size=32, eval_every=600, checkpoint_every=600)
  # 300 self-critical steps: +11 points of exact-scene accuracy for about a minute more.
  c.train.scst_steps = 300
  c.optim.learning_rate = 4e-3
  # Beam 3 fixes most greedy slips in 3-object scenes.
  c.eval.update(decoding='beam', beam_size=3)


def _real_data_set(c, arg) -> None:
  """Flickr8k/COCO/own: natural photos, so a bigger vocabulary floor and regularisation."""
  c.vocab.min_freq = 5  # Words seen < 5 times in 30k captions are mostly typos and names.
  # Beam 5 without a length bonus scored best on Flickr8k dev (docs/captioning.md, 'Evaluate,
  # predict, compare').
  c.eval.update(split='validation', batch_size=200, decoding='beam', beam_size=5,
                length_alpha=0.0)
  if arg.encoder in KERAS_BACKBONES:
    c.optim.encoder_lr_scale = 0.0  # Frozen: features are cached once per split.
    c.model.pool = 'mean'  # 2048-d grids are averaged, not flattened.
  else:
    # From scratch, end to end: a 4x4 patchify stem then strided 3x3 convs, 128 px -> 8x8.
    c.model.update(widths=(64, 96, 128, 192, 256), strides=(1, 2, 2, 1, 1), pool='mean')
    # Random resized crops and the concept head (regularisers for an encoder that sees only
    # 6,000 photos) over 5,400 steps, then 1,200 self-critical steps rewarded with CIDEr-D +
    # BLEU-4 (+0.009 BLEU-4 over CIDEr-D alone at equal CIDEr), after which greedy decoding
    # beats beam search: the best measured (docs/captioning.md, 'Measured on this machine').
    c.data.update(flip=True, crop_min_area=0.5)
    c.model.concept_weight = 1.0
    c.train.update(steps=5400, eval_every=1800, checkpoint_every=1800, scst_steps=1200)
    c.scst.bleu_weight = 1.0
    c.eval.update(decoding='greedy')
  c.model.update(dropout=0.3, every_step=False, feature_norm=True)
