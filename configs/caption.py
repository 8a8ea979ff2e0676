"""Captioning: `launch.py --config=configs/caption.py[:k=v,...] --workdir=DIR`.

Arguments: dataset= (shapes), encoder= (shapes_cnn, tiny_cnn), decoder= (inject),
runlocal (shrinks everything to a seconds-long smoke run).
"""
import ml_collections

from capjax.configlib import parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, dataset='shapes', encoder='shapes_cnn', decoder='inject',
                  runlocal=False)
  c = ml_collections.ConfigDict()
  c.task = 'caption'
  c.seed = 0
  c.dataset = arg.dataset
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # Root of a real data set.
  c.tfds_dir = ml_collections.FieldReference(None, field_type=str)  # Prepared TFDS data; None: TFDS default.

  c.shapes = ml_collections.ConfigDict(dict(
      image_size=64, num_train=20000, num_validation=500, num_test=1000, seed=0))

  c.data = ml_collections.ConfigDict(dict(caption_length=22, num_threads=2))
  c.vocab = ml_collections.ConfigDict(dict(min_freq=1, max_size=10000))

  c.model = ml_collections.ConfigDict(dict(
      encoder=arg.encoder, decoder=arg.decoder, widths=(64, 64, 128, 128),
      strides=(1, 1, 2, 1), norm=True, every_step=True, embed_dim=128, hidden=256, pool='flatten', dropout=0.0, attn_dim=128,
      attention_reg=0.01,
      dtype='float32'))

  c.train = ml_collections.ConfigDict(dict(
      steps=2400, epochs=0.0, batch_size=64, log_every=50, eval_every=400,
      checkpoint_every=400, keep_checkpoints=3))
  c.optim = ml_collections.ConfigDict(dict(
      name='adamw', learning_rate=2e-3, warmup_steps=100, final_lr_fraction=0.02,
      weight_decay=1e-4, b1=0.9, b2=0.999, momentum=0.9, grad_clip_norm=1.0))
  c.eval = ml_collections.ConfigDict(dict(
      split='test', batch_size=250, decoding='greedy', beam_size=3, length_alpha=0.6,
      meteor=True, num_samples=16))

  if arg.runlocal:
    c.shapes.update(image_size=32, num_train=256, num_validation=32, num_test=32)
    c.model.update(encoder='tiny_cnn', embed_dim=16, hidden=32)
    c.train.update(steps=20, batch_size=16, log_every=5, eval_every=10,
                   checkpoint_every=10)
    c.eval.update(batch_size=16, meteor=False, num_samples=4)
  return c
