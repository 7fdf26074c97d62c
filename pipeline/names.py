"""The names every stage must agree on, defined once and free of torch.

params.py builds its type checks from these tuples, the report lays out its
tables by them, and tests/test_names.py holds train/models.py's registry to
MODEL_NAMES: adding a network means a builder in train/models.py plus its name
and display name here (and the comment in params.yaml).
"""

from __future__ import annotations

# In the study's order (its tables list the networks this way).
MODEL_DISPLAY = {
    "alexnet": "AlexNet",
    "vgg16": "VGG16",
    "resnet50": "ResNet50",
    "densenet121": "DenseNet121",
    "inceptionv3": "InceptionV3",
}
MODEL_NAMES = tuple(MODEL_DISPLAY)

# 'plain': grey, cropped, resized; 'equalized': the same, then histogram equalization.
VARIANTS = ("plain", "equalized")
EQUALIZE_METHODS = ("global", "clahe")

# How the operating threshold is chosen on validation (train/metrics.py: choose_threshold).
THRESHOLD_RULES = ("max_f1", "target_sensitivity")

# How training starts (train.init; a checkpoint path records as "checkpoint") and what it trains.
INIT_KINDS = ("scratch", "imagenet", "checkpoint")
FREEZE_MODES = ("none", "backbone")
