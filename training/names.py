"""The training stage's choice lists, torch-free, so the command line builds its parser (and
``--help``) without importing torch. The modules that use them re-export them."""

from __future__ import annotations

SHORTCUTS = ("A", "B", "C")  # training/resnet.py: zero-pad (A), projections where shapes change (B), everywhere (C)
AUGMENTS = ("auto", "cifar", "flip", "imagenet", "none")  # training/train.py
SCHEDULES = ("step", "plateau")  # training/train.py
EVAL_TTA = ("center", "ten_crop", "multiscale")  # training/evaluate.py
