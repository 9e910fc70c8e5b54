"""Text / JSON-lines files -> Megatron `.bin/.idx`, written by megatron-core's own builder.

Input rules (also the CLI's, scripts/preprocess_data.py):
  * `*.jsonl` / `*.json`: JSON lines, one document per line, text under `json_key`; blank lines
    are skipped.
  * any other file: plain UTF-8 text, the whole file is ONE document. (Splitting on blank lines
    would turn every paragraph of a book into its own "document" with its own EOD; put one
    document per file, or use JSON lines, for finer documents.)
Every non-empty document is tokenized and gets the tokenizer's EOD appended; empty documents
are skipped and counted. Files are processed in the order given, globs expanded sorted, so the
output is byte-identical for the same inputs.
"""
from __future__ import annotations

import glob
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, List, Sequence, Union

import numpy

from .errors import DataError
from .megatron_compat import import_megatron
from .tokenizer import build_tokenizer, token_dtype

JSON_SUFFIXES = (".jsonl", ".json")


@dataclass
class PreprocessStats:
    """What `preprocess` wrote."""

    output_prefix: str
    files: List[str]
    documents: int
    tokens: int
    """Tokens written, EODs included."""
    skipped_empty: int
    vocab_size: int
    eod: int
    dtype: str
    seconds: float
    bin_path: str = field(default="")
    idx_path: str = field(default="")

    def as_dict(self) -> dict:
        return asdict(self)


def expand_inputs(inputs: Union[str, Sequence[str]]) -> List[str]:
    """Files and globs -> existing files (globs sorted, order otherwise kept)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    files: List[str] = []
    for item in inputs:
        pattern = os.path.expanduser(os.fspath(item))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"--input: the pattern {pattern!r} matches no file")
            files.extend(matches)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise DataError(f"--input: no such file {pattern!r}")
    if not files:
        raise DataError("--input: no input files given")
    return files


def iter_documents(files: Sequence[str], json_key: str = "text") -> Iterator[str]:
    """Yield the documents of `files` (see the module docstring for the rules)."""
    for path in files:
        if path.endswith(JSON_SUFFIXES):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno}"
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{where}: not valid JSON ({err.msg}); expected one object per line") from err
                    if not isinstance(record, dict) or json_key not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise DataError(
                            f"{where}: no field {json_key!r} (found {keys}); pick the text field with --json-key"
                        )
                    text = record[json_key]
                    if not isinstance(text, str):
                        raise DataError(f"{where}: field {json_key!r} is {type(text).__name__}, not a string")
                    yield text
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except UnicodeDecodeError as err:
                raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


# Per-process tokenizer for the worker pool (built once per worker from the spec string, since
# HF tokenizers are cheaper to rebuild than to pickle per task).
_WORKER_TOKENIZER = None


def _init_worker(spec: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = build_tokenizer(spec)


def _encode_in_worker(text: str) -> List[int]:
    return _WORKER_TOKENIZER.tokenize(text)


def _encoded(docs: Iterable[str], tokenizer, spec: str, workers: int) -> Iterator[List[int]]:
    if workers <= 1:
        for text in docs:
            yield tokenizer.tokenize(text)
        return
    import multiprocessing

    # fork where available: workers then start without re-importing torch/megatron (seconds each).
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _init_worker, (spec,)) as pool:
        # imap keeps document order, so the output does not depend on the worker count.
        yield from pool.imap(_encode_in_worker, docs, chunksize=16)


def preprocess(
    inputs: Union[str, Sequence[str]],
    output_prefix: str,
    tokenizer_spec: str = "byte",
    json_key: str = "text",
    workers: int = 1,
) -> PreprocessStats:
    """Tokenize `inputs` into `<output_prefix>.bin/.idx` (one sequence per document, EOD-terminated).

    Files are written under temporary names and renamed into place, so a reader never sees a
    half-written pair from a crashed run.
    """
    start = time.time()
    files = expand_inputs(inputs)
    tokenizer = build_tokenizer(tokenizer_spec)
    dtype = token_dtype(tokenizer.vocab_size)
    eod = tokenizer.eod
    output_prefix = os.path.abspath(os.path.expanduser(os.fspath(output_prefix)))
    os.makedirs(os.path.dirname(output_prefix), exist_ok=True)

    indexed = import_megatron("megatron.core.datasets.indexed_dataset")
    bin_path, idx_path = indexed.get_bin_path(output_prefix), indexed.get_idx_path(output_prefix)
    tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_bin, tmp_idx = bin_path + tag, idx_path + tag

    documents = tokens = skipped = 0
    builder = indexed.IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    try:
        for ids in _encoded(iter_documents(files, json_key), tokenizer, tokenizer_spec, workers):
            if not ids:
                skipped += 1
                continue
            doc = numpy.asarray(ids + [eod], dtype=numpy.int64)
            builder.add_document(doc, [doc.size])
            documents += 1
            tokens += doc.size
        builder.finalize(tmp_idx)
        if documents == 0:
            raise DataError(f"--input: {len(files)} file(s) hold no non-empty document; nothing to write")
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        builder.data_file.close()
        for tmp in (tmp_bin, tmp_idx):
            if os.path.exists(tmp):
                os.remove(tmp)

    return PreprocessStats(
        output_prefix=output_prefix, files=files, documents=documents, tokens=tokens,
        skipped_empty=skipped, vocab_size=tokenizer.vocab_size, eod=eod,
        dtype=numpy.dtype(dtype).name, seconds=round(time.time() - start, 3),
        bin_path=bin_path, idx_path=idx_path,
    )
