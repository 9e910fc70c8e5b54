"""Command-line overrides checked against the typed schema, before and after Hydra composes them.

Hydra lets `+group.key=value` add a key that the schema does not have (its own advice for a typo like
`trainer.max_stpes=5` is to add the `+`), and the key is then dropped without a word when the config
becomes a dataclass: the run ignores the setting. Here every override key is looked up in the schema
first; one that is not a field is refused with the valid keys of its group and the nearest names.
Hydra's type errors ("Error merging override trainer.max_steps=abc") are rewritten to name the field and
the expected type. Torch-free: the launcher runs this before torchrun starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import functools
import typing
from typing import Iterable, Optional, Sequence

from .config import ShardwiseConfig


@functools.lru_cache(maxsize=None)
def fields_of(cls: type) -> dict[str, object]:
    """{field name: resolved type} of a schema dataclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unwrap(tp):
    """Optional[X] -> (X, True); X -> (X, False)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else tp), True
    return tp, False


@functools.lru_cache(maxsize=None)
def all_keys(cls: type = ShardwiseConfig, prefix: str = "") -> tuple[str, ...]:
    """Every dotted leaf key of the schema (groups recursed)."""
    out = []
    for name, tp in fields_of(cls).items():
        inner, _ = _unwrap(tp)
        if dataclasses.is_dataclass(inner):
            out += all_keys(inner, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return tuple(out)


def field_type(key: str):
    """The schema type of dotted `key`, or None when it is not a field."""
    cls: object = ShardwiseConfig
    for part in key.split("."):
        inner, _ = _unwrap(cls)
        if not dataclasses.is_dataclass(inner) or part not in fields_of(inner):
            return None
        cls = fields_of(inner)[part]
    return cls


def type_name(tp) -> str:
    """How the expected type reads in a message: `int`, `one of fp32, bf16`, `float or null`, ..."""
    inner, optional = _unwrap(tp)
    if isinstance(inner, type) and issubclass(inner, enum.Enum):
        text = "one of " + ", ".join(m.name for m in inner)
    elif typing.get_origin(inner) in (list, typing.List):
        (item,) = typing.get_args(inner) or (str,)
        text = f"a list of {type_name(item)} ([a,b,...])"
    elif inner is bool:
        text = "bool (true or false)"
    elif isinstance(inner, type):
        text = inner.__name__
    else:
        text = str(inner)
    return f"{text} or null" if optional else text


def _suggest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.6)


def unknown_key_message(override: str, key: str) -> Optional[str]:
    """None when `key` is a schema path (a field, or inside a list/dict field); else the refusal."""
    parts = key.split(".")
    cls: object = ShardwiseConfig
    for i, part in enumerate(parts):
        inner, _ = _unwrap(cls)
        if not dataclasses.is_dataclass(inner):
            if typing.get_origin(inner) in (list, dict, typing.List, typing.Dict):
                return None  # an element of a list/dict field (data.paths.0=...): Hydra checks it
            return (f"{override}: {'.'.join(parts[:i])} is a single value ({type_name(inner)}), not a group; "
                    f"set it with {'.'.join(parts[:i])}=VALUE")
        fields = fields_of(inner)
        if part in fields:
            cls = fields[part]
            continue
        group = ".".join(parts[:i])
        where = f"{group} has no key {part!r}" if group else f"the config has no key {part!r}"
        near = [f"{group}.{s}" if group else s for s in _suggest(part, fields)]
        if not near:  # a key given under the wrong group (trainer.num_experts): search every group
            leaves = [k.rsplit(".", 1)[-1] for k in all_keys()]
            near = [k for k in all_keys() if k.rsplit(".", 1)[-1] in _suggest(part, set(leaves), n=2)][:3]
        hint = f" Did you mean {' or '.join(near[:3])}?" if near else ""
        valid = ", ".join(fields)
        added = " (a leading + cannot add keys to the typed schema)" if override.lstrip("~").startswith("+") else ""
        return f"{override}: {where}{added}.{hint} Valid keys of {group or 'the config'}: {valid}"
    return None


def override_key(override: str) -> str:
    """`+a.b=1` / `++a.b=1` / `~a.b` / `a.b@pkg=x` -> `a.b`."""
    key = override.split("=", 1)[0].lstrip("~+")
    return key.split("@", 1)[0]


def check_override_keys(overrides: Sequence[str], groups: Iterable[str]) -> list[str]:
    """Problems of the override keys: one message per key that is not in the schema.

    `groups` are the config-group folders (recipe, model, zero, ...): `zero=stage3` picks a file, it is
    not a field, and Hydra itself reports an unknown option of a group."""
    groups = set(groups)
    problems = []
    for o in overrides:
        key = override_key(o)
        if not key or key.startswith("hydra") or key in groups:
            continue
        msg = unknown_key_message(o, key)
        if msg:
            problems.append(msg)
    return problems


def explain_validation_error(exc: BaseException) -> Optional[str]:
    """`key=value: expected TYPE` for an OmegaConf type/value error anywhere in `exc`'s cause chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        key = getattr(exc, "full_key", None)
        if key:
            tp = field_type(key)
            if tp is not None:
                value = getattr(exc, "value", None)
                shown = f"={value!r}" if value is not None else ""
                return f"{key}{shown}: expected {type_name(tp)}; fix: set {key} to a value of that type"
        exc = exc.__cause__ or exc.__context__
    return None
