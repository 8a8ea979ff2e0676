"""The data layer both tasks share. Readers of users' files in their real layouts: flickr8k.py,
coco.py and own_captions.py (captions), tiny_imagenet.py (Tiny ImageNet and image folders), on
reading.py (DataError, ReadReport, the split names, what every reader ends with) and images.py
(decoding any image file). The generated worlds: shapes.py (captions) and classify_world.py
(classes), rendered by generate.py. TFDS builders: caption_tfds.py, classify_tfds.py,
shapes_tfds.py. Then tokenizer.py (the vocabulary), features.py (the frozen-encoder feature
cache) and loading.py (what every input pipeline shares). catalog.py names the real caption
data sets without importing TFDS, for config files.
"""
