"""The names every stage must agree on, defined once and free of torch.

params.py builds its type checks from these tuples and the report lays out its
tables by them. The networks come from their registry (pipeline/networks.py):
adding one there adds it here.
"""

from __future__ import annotations

from pipeline.networks import NETWORKS

MODEL_NAMES = tuple(NETWORKS)  # in the study's order
MODEL_DISPLAY = {name: net.display for name, net in NETWORKS.items()}

# 'plain': grey, cropped, resized; 'equalized': the same, then histogram equalization.
VARIANTS = ("plain", "equalized")
EQUALIZE_METHODS = ("global", "clahe")

# How the operating threshold is chosen on validation (train/metrics.py: choose_threshold).
THRESHOLD_RULES = ("max_f1", "target_sensitivity")

# How training starts (train.init; a checkpoint path records as "checkpoint") and what it trains.
INIT_KINDS = ("scratch", "imagenet", "checkpoint")
FREEZE_MODES = ("none", "backbone")
