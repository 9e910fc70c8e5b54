"""Full-content check of Megatron `.bin/.idx` pairs (`data.verify=true`, `scripts/preprocess_data.py --verify`).

The start-up checks (index_file.read_index, datasets.check_tokens) read the headers, the file sizes and the
first and last million tokens: cheap, and enough for a wrong tokenizer or a truncated file. Garbage in the
middle of a `.bin` (a bad copy, a crashed writer) passes them and surfaces much later as a bare IndexError
in the embedding. This reads everything: the index arrays must be consistent (pointers = running byte
offsets of the lengths, document boundaries increasing from 0 to the sequence count) and every token id
must be in [0, vocab_size). The first problem is reported with the file and the document index.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy

from .errors import DataError
from .index_file import HEADER_BYTES, read_index

_CHUNK_TOKENS = 1 << 24  # 16 Mi tokens per read: bounded memory on multi-GB files
_FIX = "re-create it with scripts/preprocess_data.py, or restore the file from a good copy"


def _index_arrays(prefix: str, count: int, docs: int) -> tuple[numpy.ndarray, numpy.ndarray]:
    """(sequence pointers, document indices) of `<prefix>.idx`, after the lengths."""
    with open(prefix + ".idx", "rb") as f:
        f.seek(HEADER_BYTES + count * 4)
        pointers = numpy.fromfile(f, dtype=numpy.int64, count=count)
        doc_idx = numpy.fromfile(f, dtype=numpy.int64, count=docs)
    return pointers, doc_idx


def _document_of(doc_idx: numpy.ndarray, sequence: int) -> int:
    return int(numpy.searchsorted(doc_idx, sequence, side="right")) - 1


def verify_prefix(prefix: str, vocab_size: Optional[int] = None) -> dict:
    """Check one prefix completely; raises DataError naming the file and the document. Returns a summary
    {documents, sequences, tokens, max_token} for the caller's report."""
    info = read_index(prefix)  # header, dtype, lengths array present, .bin size = sum of lengths
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    lengths = info.sequence_lengths.astype(numpy.int64)
    count = len(lengths)
    with open(idx, "rb") as f:
        f.seek(26)
        docs = int(numpy.frombuffer(f.read(8), dtype=numpy.uint64)[0])
    pointers, doc_idx = _index_arrays(prefix, count, docs)
    if len(pointers) != count or len(doc_idx) != docs:
        raise DataError(f"{idx} is truncated (its pointer/document arrays are short); {_FIX}")
    bad = numpy.flatnonzero(lengths < 0)
    if bad.size:
        s = int(bad[0])
        raise DataError(f"{idx}: document {_document_of(doc_idx, s)} (sequence {s}) has a negative length "
                        f"{int(lengths[s])}; the index is corrupt, {_FIX}")
    falling = numpy.flatnonzero(numpy.diff(doc_idx) < 0)
    if docs < 1 or doc_idx[0] != 0 or doc_idx[-1] != count or falling.size:
        where = int(falling[0]) + 1 if falling.size else (0 if docs < 1 or doc_idx[0] != 0 else docs - 1)
        raise DataError(f"{idx}: the document boundaries are inconsistent (they must rise from 0 to the sequence "
                        f"count {count}; first bad entry: document {where}); the index is corrupt, {_FIX}")
    expected = numpy.zeros(count, dtype=numpy.int64)
    if count:
        numpy.cumsum(lengths[:-1] * info.dtype.itemsize, out=expected[1:])
    wrong = numpy.flatnonzero(pointers != expected)
    if wrong.size:
        s = int(wrong[0])
        raise DataError(f"{idx}: document {_document_of(doc_idx, s)} (sequence {s}) points at byte "
                        f"{int(pointers[s])} of {bin_}, expected {int(expected[s])}; the index is corrupt, {_FIX}")
    total = int(lengths.sum())
    top = -1
    if total:
        data = numpy.memmap(bin_, dtype=info.dtype, mode="r", shape=(total,))
        starts = numpy.concatenate([[0], numpy.cumsum(lengths)])
        for lo in range(0, total, _CHUNK_TOKENS):
            chunk = numpy.asarray(data[lo:lo + _CHUNK_TOKENS])
            top = max(top, int(chunk.max()))
            out = (chunk < 0) | (chunk >= vocab_size) if vocab_size else chunk < 0
            hits = numpy.flatnonzero(out)
            if hits.size:
                pos = lo + int(hits[0])
                s = int(numpy.searchsorted(starts, pos, side="right")) - 1
                limit = f"the vocabulary has {vocab_size} ids (0..{vocab_size - 1})" if vocab_size else "ids must be >= 0"
                raise DataError(f"{bin_}: document {_document_of(doc_idx, s)} (sequence {s}, token {pos - int(starts[s])} "
                                f"of it, token {pos} of the file) has token id {int(chunk[hits[0]])}, but {limit}: the "
                                f"file is corrupt or was made with another tokenizer; {_FIX}")
        del data
    return {"prefix": prefix, "documents": docs - 1 if docs else 0, "sequences": count, "tokens": total,
            "max_token": top, "bytes": os.path.getsize(bin_)}
