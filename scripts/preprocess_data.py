#!/usr/bin/env python
"""Tokenize text into Megatron .bin/.idx files for `data.paths`.

    python scripts/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \
        --tokenizer byte            # or --tokenizer path/to/tokenizer.json

Inputs: `*.jsonl`/`*.json` are JSON lines (one document per line, text under --json-key);
any other file is plain UTF-8 text and the whole file is one document. Each document gets the
tokenizer's end-of-document token appended. Writes <prefix>.bin and <prefix>.idx with tokens as
uint16 when the vocabulary has <= 65536 ids, else int32. The logic lives in
shardwise.trainer.data.preprocess; this is its command line.

    python scripts/preprocess_data.py --verify data/corpus [data/other ...] [--tokenizer byte]

checks existing pairs completely instead (every document: index consistency, .bin size, token ids
below the tokenizer's vocabulary; shardwise.trainer.data.verify) and names the file and document
of the first problem. Exit code 2 on a problem, 0 when every prefix is sound.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="input files or globs (quote globs)")
    parser.add_argument("--output-prefix", help="output path without .bin/.idx")
    parser.add_argument("--verify", nargs="+", metavar="PREFIX",
                        help="check existing .bin/.idx pairs completely instead of writing (token ids against "
                             "--tokenizer's vocabulary)")
    parser.add_argument("--tokenizer", default="byte", help="`byte` or the path of a HF tokenizer.json")
    parser.add_argument("--json-key", default="text", help="text field of JSON-lines inputs (default: text)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    args = parser.parse_args(argv)
    if not args.verify and not (args.input and args.output_prefix):
        parser.error("give --input and --output-prefix (tokenize), or --verify PREFIX... (check)")

    try:
        from shardwise.trainer.data import DataError, preprocess
    except ImportError:  # run from a source checkout without `pip install -e .`
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from shardwise.trainer.data import DataError, preprocess

    if args.verify:
        return verify(args.verify, args.tokenizer, DataError)
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


def verify(prefixes, tokenizer_spec: str, DataError) -> int:
    from shardwise.trainer.data import build_tokenizer
    from shardwise.trainer.data.verify import verify_prefix

    try:
        vocab = build_tokenizer(tokenizer_spec).vocab_size
        for prefix in prefixes:
            p = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
            r = verify_prefix(os.path.abspath(os.path.expanduser(p)), vocab)
            print(f"ok {r['prefix']}: {r['documents']} documents, {r['tokens']} tokens, "
                  f"max token id {r['max_token']} < {vocab}")
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
