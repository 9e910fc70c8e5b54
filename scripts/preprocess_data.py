#!/usr/bin/env python
"""Tokenize text into Megatron .bin/.idx files for `data.paths`.

    python scripts/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer byte            # or --tokenizer path/to/tokenizer.json

Inputs: `*.jsonl`/`*.json` are JSON lines (one document per line, text under --json-key);
any other file is plain UTF-8 text and the whole file is one document. Each document gets the
tokenizer's end-of-document token appended. Writes <prefix>.bin and <prefix>.idx with tokens as
uint16 when the vocabulary has <= 65536 ids, else int32. The logic lives in
shardwise.trainer.data.preprocess; this is its command line.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="input files or globs (quote globs)")
    parser.add_argument("--output-prefix", required=True, help="output path without .bin/.idx")
    parser.add_argument("--tokenizer", default="byte", help="`byte` or the path of a HF tokenizer.json")
    parser.add_argument("--json-key", default="text", help="text field of JSON-lines inputs (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    args = parser.parse_args(argv)

    try:
        from shardwise.trainer.data import DataError, preprocess
    except ImportError:  # run from a source checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from shardwise.trainer.data import DataError, preprocess

    try:
        stats = preprocess(args.input, args.output_prefix, args.tokenizer,
                           json_key=args.json_key, workers=args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {stats.bin_path} and {stats.idx_path}: {stats.documents} documents, "
        f"{stats.tokens} tokens ({stats.dtype}, vocab {stats.vocab_size}, eod {stats.eod}) "
        f"from {len(stats.files)} file(s) in {stats.seconds:.1f}s"
        + (f"; skipped {stats.skipped_empty} empty document(s)" if stats.skipped_empty else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
