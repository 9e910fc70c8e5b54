"""`DataConfig` -> megatron-core GPT datasets (train, valid), with the input checks megatron lacks.

megatron-core's `BlendedMegatronDatasetBuilder` does the real work: document/sample/shuffle
indices, blending, and caching those indices under `path_to_cache`. Before calling it we check
everything we can from the `.idx` headers, on every rank, because megatron's own failures are
bare asserts (or worse: a split with fewer tokens than it is asked for makes
`GPTDataset._get_num_epochs` loop forever), and under torch.distributed an error raised on rank 0
while the other ranks wait in its barrier turns into a hang instead of a message.
"""
from __future__ import annotations

import hashlib
import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy
import torch

from ...comm import collectives as C
from .corpus import ensure_bundled_corpus
from .errors import DataError
from .index_file import Blend, IndexInfo, _is_number, parse_blend, read_index  # noqa: F401  (re-exported)
from .megatron_compat import import_megatron, quiet_megatron_logs, rank_zero_without_process_group
from .tokenizer import build_tokenizer


# Tokens read from each end of a .bin to catch data made with a bigger tokenizer (full scans of
# multi-GB files would make every start-up slow; a wrong tokenizer shows up everywhere).
_SCAN_TOKENS = 1 << 20


def _check_split(split: str) -> None:
    parts = [p.strip() for p in str(split).split(",")]
    ok = 1 <= len(parts) <= 3 and all(_is_number(p) and float(p) >= 0 and math.isfinite(float(p)) for p in parts)
    if not ok or sum(float(p) for p in parts) <= 0:
        raise DataError(f"data.split={split!r}: expected up to 3 non-negative train,valid,test weights, e.g. '969,30,1'")
    if float(parts[0]) == 0:
        raise DataError(f"data.split={split!r} gives the train split weight 0; nothing to train on")


def check_tokens(info: IndexInfo, tokenizer, spec: str) -> None:
    """The stored dtype can hold the tokenizer's ids, and the stored ids fit its vocabulary."""
    idx = info.prefix + ".idx"
    fix = f"re-run scripts/preprocess_data.py --tokenizer {spec} or set data.tokenizer to the tokenizer the data was made with"
    if info.dtype.kind not in "iu":
        raise DataError(f"{idx}: tokens are stored as {info.dtype.name}, not integers; {fix}")
    limit = int(numpy.iinfo(info.dtype).max) + 1
    if tokenizer.vocab_size > limit:
        raise DataError(
            f"{idx}: tokens are stored as {info.dtype.name} (ids < {limit}) but data.tokenizer={spec!r} "
            f"has {tokenizer.vocab_size} ids, so this data cannot come from it; {fix}"
        )
    total = int(info.sequence_lengths.astype(numpy.int64).sum())
    if total == 0:
        return
    data = numpy.memmap(info.prefix + ".bin", dtype=info.dtype, mode="r")
    head, tail = data[:_SCAN_TOKENS], data[max(0, total - _SCAN_TOKENS):]
    top = int(max(head.max(), tail.max()))
    if top >= tokenizer.vocab_size or min(int(head.min()), int(tail.min())) < 0:
        raise DataError(
            f"{info.prefix}.bin contains token id {top} but data.tokenizer={spec!r} has only "
            f"{tokenizer.vocab_size} ids; the data was tokenized with another tokenizer. {fix}"
        )


def _split_tokens(info: IndexInfo, bookends: Tuple[float, float]) -> Tuple[int, int]:
    """(documents, tokens) of one split, with megatron's own rounding of the split bookends."""
    n = info.sequence_lengths.shape[0]
    beg, end = int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))
    return end - beg, int(info.sequence_lengths[beg:end].astype(numpy.int64).sum())


def _cache_path(cache_dir: str, infos: Sequence[IndexInfo]) -> str:
    # megatron keys its index cache by prefix path and settings, not file contents, so data
    # re-written at the same prefix would silently reuse stale indices. Keying the folder by the
    # files' sizes and mtimes makes that a cache miss instead.
    h = hashlib.sha1()
    for info in infos:
        for path in (info.prefix + ".idx", info.prefix + ".bin"):
            st = os.stat(path)
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns};".encode())
    path = [os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "index_cache", h.hexdigest()[:16])]
    if torch.distributed.is_initialized():
        # Rank 0 writes the cache and the others read it, so they must agree on the folder even
        # when each node has its own copy of the data (with its own mtimes).
        C.broadcast_object_list(path, src=0)
    return path[0]


def build_datasets(cfg, *, seed: int, train_samples: int, eval_samples: int, vocab_size: int):
    """Build megatron-core GPT datasets for `cfg` (a `DataConfig`); returns `(train_ds, valid_ds)`.

    Items are megatron's dicts of `[seq_len]` tensors: `tokens`, `labels` (tokens shifted by
    one), `loss_mask`, `position_ids` (+ `dataset_id` from a blend of several prefixes).
    `train_ds` holds at least `train_samples` samples (exactly that many for a weighted blend;
    for a blend of unweighted prefixes one epoch, capped at `train_samples`); `valid_ds` is None
    when `eval_samples == 0`. Empty `cfg.paths` selects the bundled corpus. Call it on every rank
    when a process group is initialized: megatron builds on rank 0, then barriers on the default
    group. Bad inputs raise `DataError` on every rank alike (checked before megatron runs).
    """
    if cfg.seq_len < 1:
        raise DataError(f"data.seq_len={cfg.seq_len} must be positive")
    if train_samples < 1 or eval_samples < 0:
        raise ValueError(f"train_samples={train_samples} must be >= 1 and eval_samples={eval_samples} >= 0")
    _check_split(cfg.split)
    tokenizer = build_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"model.vocab_size={vocab_size} is smaller than the vocabulary of data.tokenizer="
            f"{cfg.tokenizer!r} ({tokenizer.vocab_size} ids); set model.vocab_size >= {tokenizer.vocab_size}"
        )
    if cfg.paths:
        prefixes, weights = parse_blend(cfg.paths)
    else:
        prefixes, weights = [ensure_bundled_corpus(cfg.cache_dir, cfg.tokenizer)], None
    infos = [read_index(p) for p in prefixes]
    if getattr(cfg, "verify", False):  # first: it names the document of a bad token, check_tokens only the file
        from .verify import verify_prefix

        for info in infos:
            verify_prefix(info.prefix, tokenizer.vocab_size)
    for info in infos:
        check_tokens(info, tokenizer, cfg.tokenizer)

    gpt = import_megatron("megatron.core.datasets.gpt_dataset")
    builder_mod = import_megatron("megatron.core.datasets.blended_megatron_dataset_builder")
    with quiet_megatron_logs():
        config = gpt.GPTDatasetConfig(
            random_seed=seed,
            sequence_length=cfg.seq_len,
            blend=(prefixes, weights),
            split=cfg.split,
            path_to_cache=_cache_path(cfg.cache_dir, infos),
            tokenizer=tokenizer,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=cfg.eod_mask_loss,
            create_attention_mask=False,
        )
    # The split weights fix which documents belong to train/valid; we only drop whole splits
    # from the build: the test split (the trainer never reads it) and an unrequested validation
    # split. Both are asked for 0 samples, and a 0-sample split with fewer than seq_len+1 tokens
    # (e.g. the 1/1000 test share of a small corpus) would make megatron loop forever.
    config.split_matrix = list(config.split_matrix)
    config.split_matrix[2] = None
    if eval_samples == 0:
        config.split_matrix[1] = None
    sizes = [train_samples, eval_samples, 0]
    for i, name in ((0, "train"), (1, "validation")):
        bookends = config.split_matrix[i]
        if bookends is None:
            if sizes[i] > 0:
                raise DataError(
                    f"evaluation asks for {eval_samples} samples but data.split={cfg.split!r} gives "
                    "the validation split weight 0; give it a weight (e.g. '969,30,1') or disable evaluation"
                )
            continue
        for info in infos:
            docs, tokens = _split_tokens(info, bookends)
            if tokens >= cfg.seq_len + 1:
                continue
            raise DataError(
                f"data.seq_len={cfg.seq_len} is longer than the {name} split of {info.prefix}: with "
                f"data.split={cfg.split!r} it gets {docs} document(s), {tokens} tokens, and a sample "
                f"needs seq_len+1. Lower data.seq_len (<= {max(tokens - 1, 0)}), change data.split, or add data"
            )

    try:
        with quiet_megatron_logs(), rank_zero_without_process_group():
            builder = builder_mod.BlendedMegatronDatasetBuilder(gpt.GPTDataset, sizes, lambda: True, config)
            train_ds, valid_ds, _ = builder.build()
    except DataError:
        raise
    except FileNotFoundError as err:
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            raise DataError(
                f"rank {torch.distributed.get_rank()} found no dataset index cache at {config.path_to_cache}: "
                "megatron writes it on global rank 0 and the other ranks read it, so data.cache_dir "
                "must be on a filesystem shared by all nodes"
            ) from err
        raise
    except Exception as err:
        raise DataError(
            f"megatron-core could not build datasets from data.paths={cfg.paths!r} "
            f"(data.split={cfg.split!r}, data.seq_len={cfg.seq_len}): {type(err).__name__}: {err}"
        ) from err
    return train_ds, valid_ds
