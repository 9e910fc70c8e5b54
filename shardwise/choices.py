"""Fixed-choice config fields as str-valued Enums.

A field typed with one of these makes OmegaConf/Hydra refuse a value outside the set when the config is
composed (`trainer.precision=fp16` fails at once, listing the valid names), while the code that reads the
field keeps working with plain strings: a member *is* its value (`Precision.bf16 == "bf16"`, hashes like
it, formats as `bf16`, dumps to YAML/JSON as `bf16`). Member names equal their values because OmegaConf
converts `name -> member` by name. Torch-free: the launcher composes configs before importing torch.
"""
from __future__ import annotations

from enum import Enum
from typing import Sequence


class Choice(str, Enum):
    """Base of the choice Enums: compares, hashes and prints as its string value."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def names(cls) -> list[str]:
        return [m.value for m in cls]


def choice(name: str, values: Sequence[str], module: str, doc: str = "") -> type[Choice]:
    """A Choice Enum whose values need not be Python identifiers (`1f1b`). `module` is the defining module's
    `__name__`, so members pickle by reference like any class-defined Enum."""
    enum = Choice(name, [(v, v) for v in values], module=module, qualname=name)
    enum.__doc__ = doc or f"One of: {', '.join(values)}."
    return enum
