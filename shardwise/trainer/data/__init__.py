"""Data pipeline: tokenizers, preprocessing to Megatron .bin/.idx, megatron-core GPT datasets,
the bundled default corpus, and the deterministic data-parallel batch iterator.

    tok = build_tokenizer("byte")                       # or a HF tokenizer.json path
    preprocess(["docs/*.jsonl"], "data/my_corpus", "byte")
    train_ds, valid_ds = build_datasets(cfg.data, seed=..., train_samples=..., eval_samples=...,
                                        vocab_size=cfg.model.vocab_size)
    it = GlobalBatchIterator(train_ds, global_batch_size=G, micro_batch_size=m,
                             dp_rank=r, dp_size=dp, consumed_samples=resumed)
    micro_batches = it.next_step()                      # list of dicts of [m, seq_len] tensors

Names are imported lazily (PEP 562): megatron-core takes seconds to import, and code that only
needs e.g. `DataError` or the sampler should not pay for it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import DataError

_EXPORTS = {
    "build_tokenizer": ".tokenizer",
    "preprocess": ".preprocess",
    "ensure_bundled_corpus": ".corpus",
    "build_datasets": ".datasets",
    "GlobalBatchIterator": ".sampler",
    "eval_batches": ".sampler",
}

__all__ = ["DataError", *_EXPORTS]

if TYPE_CHECKING:
    from .corpus import ensure_bundled_corpus  # noqa: F401
    from .datasets import build_datasets  # noqa: F401
    from .preprocess import preprocess  # noqa: F401
    from .sampler import GlobalBatchIterator, eval_batches  # noqa: F401
    from .tokenizer import build_tokenizer  # noqa: F401


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
