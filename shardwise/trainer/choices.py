"""The fixed-choice fields of the trainer's schema (shardwise.trainer.config), as str-valued Enums:
Hydra refuses any other value when the config is composed (shardwise.choices)."""
from __future__ import annotations

from ..choices import choice

RouterScore = choice("RouterScore", ["softmax", "sigmoid"], __name__)
RouteGroupScore = choice("RouteGroupScore", ["top2", "max"], __name__)
Attention = choice("Attention", ["mha", "mla"], __name__)
PPSchedule = choice("PPSchedule", ["gpipe", "1f1b", "interleaved_1f1b", "interleaved_zero_bubble",
                                   "zbv_zero_bubble"], __name__)
PPPartition = choice("PPPartition", ["uniform", "balanced"], __name__)
Backend = choice("Backend", ["auto", "nccl", "gloo"], __name__)
Precision = choice("Precision", ["fp32", "bf16"], __name__)
Device = choice("Device", ["auto", "cpu", "cuda"], __name__)
