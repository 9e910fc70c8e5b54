"""The bundled default corpus: Python's own help texts, byte-tokenized, built once and cached.

`pydoc_data.topics.topics` ships with every CPython (the text behind `help("FORMATTING")` etc.):
~80 long English documents, ~460 KB. That is enough for smoke tests, examples and CI to train on
real text with no download. Each topic is one document.

Layout, all under `<cache_dir>/corpus/pydoc_topics_byte/`:
  source.jsonl               the documents, sorted by topic name ({"topic", "text"} per line)
  text_document.bin / .idx   preprocess(source.jsonl, ..., "byte")
  manifest.json              sizes and sha256 of the .bin/.idx; written last
The folder is assembled under a temporary name and renamed into place (a directory rename is
atomic), so a process never sees a half-built corpus; it is only rebuilt when missing or when
the files do not match the manifest.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import uuid
from typing import Optional

import torch

from ...comm import collectives as C
from .errors import DataError

CORPUS_NAME = "pydoc_topics_byte"
PREFIX_NAME = "text_document"
_MANIFEST = "manifest.json"


def corpus_dir(cache_dir: str) -> str:
    return os.path.join(os.path.abspath(os.path.expanduser(cache_dir)), "corpus", CORPUS_NAME)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_valid(folder: str) -> bool:
    """True when the manifest exists and the .bin/.idx match its sizes and hashes."""
    try:
        with open(os.path.join(folder, _MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        for name, meta in manifest["files"].items():
            path = os.path.join(folder, name)
            if os.path.getsize(path) != meta["bytes"] or _sha256(path) != meta["sha256"]:
                return False
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _build(target: str) -> None:
    """Assemble the corpus in a temporary sibling folder, then rename it to `target`."""
    from pydoc_data.topics import topics

    from .preprocess import preprocess

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{CORPUS_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        source = os.path.join(tmp, "source.jsonl")
        with open(source, "w", encoding="utf-8") as f:
            for topic in sorted(topics):
                f.write(json.dumps({"topic": topic, "text": topics[topic]}, ensure_ascii=False) + "\n")
        stats = preprocess([source], os.path.join(tmp, PREFIX_NAME), "byte", json_key="text")
        manifest = {
            "source": "pydoc_data.topics.topics",
            "python": sys.version.split()[0],
            "tokenizer": "byte",
            "documents": stats.documents,
            "tokens": stats.tokens,
            "files": {
                os.path.basename(p): {"bytes": os.path.getsize(p), "sha256": _sha256(p)}
                for p in (stats.bin_path, stats.idx_path)
            },
        }
        with open(os.path.join(tmp, _MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)

        if os.path.lexists(target) and not _is_valid(target):
            # Corrupt leftover: move it aside first (rename over a non-empty dir is refused).
            trash = f"{tmp}.old"
            try:
                os.rename(target, trash)
                shutil.rmtree(trash, ignore_errors=True)
            except FileNotFoundError:
                pass  # someone else moved it first
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process installed a corpus between our check and our rename; if it is
            # good we simply use it (its content is identical to ours), otherwise report it.
            if not _is_valid(target):
                raise DataError(
                    f"could not install the bundled corpus at {target}: the folder exists but is "
                    "not a valid corpus; delete it and retry"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_node_leader() -> bool:
    # torchrun/SLURM launchers export LOCAL_RANK; one builder per node also covers a node-local
    # cache_dir. Without it fall back to global rank 0 (others build after the barrier if needed).
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.strip().isdigit():
        return int(local) == 0
    return torch.distributed.get_rank() == 0


def ensure_bundled_corpus(cache_dir: str = "~/.cache/shardwise", tokenizer: str = "byte") -> str:
    """Build (first use) or reuse the bundled corpus; return its Megatron data prefix.

    Safe to call from every rank: with an initialized process group, one process per node
    builds, all ranks meet at a barrier (so every rank must call this), and any rank that still
    finds no valid corpus, e.g. on a node-local cache_dir without LOCAL_RANK set, builds its own
    copy (the atomic rename makes concurrent builds harmless). Works without a process group.
    """
    if tokenizer != "byte":
        raise DataError(
            f"data.paths is empty, which selects the bundled corpus, but it is byte-tokenized and "
            f"data.tokenizer={tokenizer!r}. Set data.tokenizer=byte, or preprocess your text with "
            "scripts/preprocess_data.py --tokenizer <that tokenizer> and list the prefix in data.paths"
        )
    target = corpus_dir(cache_dir)
    prefix = os.path.join(target, PREFIX_NAME)
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        if not _is_valid(target):
            _build(target)
        return prefix

    error: Optional[BaseException] = None
    if _is_node_leader() and not _is_valid(target):
        try:
            _build(target)
        except Exception as err:  # still reach the barrier, or the other ranks would hang in it
            error = err
    C.barrier()
    if error is not None:
        raise error
    if not _is_valid(target):
        _build(target)
    return prefix
