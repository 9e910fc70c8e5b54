"""Full-content data check (data.verify, scripts/preprocess_data.py --verify): corruption in the middle of a
file names the file and the document, where the start-up checks see nothing (they read the headers, the
sizes and the first/last million tokens)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardwise.trainer.config import DataConfig
from shardwise.trainer.data import DataError, build_datasets, preprocess
from shardwise.trainer.data.datasets import check_tokens, read_index
from shardwise.trainer.data.index_file import HEADER_BYTES
from shardwise.trainer.data.tokenizer import build_tokenizer
from shardwise.trainer.data.verify import verify_prefix

REPO = Path(__file__).resolve().parents[1]
DOC_TOKENS = 400_000  # 3 documents > 2 x 1 Mi tokens: the middle one is outside check_tokens' scan


def make_corpus(tmp_path: Path, name: str = "c") -> str:
    docs = [tmp_path / f"d{i}.txt" for i in range(3)]
    for i, d in enumerate(docs):
        d.write_text(("abcdefgh"[i] * 7 + " ") * (DOC_TOKENS // 8) * (5 if i == 1 else 1))
    preprocess([str(d) for d in docs], tmp_path / name, "byte")
    return str(tmp_path / name)


def corrupt_token(prefix: str, position: int, value: int = 60000) -> None:
    data = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    data[position] = value
    data.flush()


def test_garbage_in_the_middle_names_file_and_document(tmp_path):
    prefix = make_corpus(tmp_path)
    assert verify_prefix(prefix, 257)["documents"] == 3
    lengths = read_index(prefix).sequence_lengths
    pos = int(lengths[0]) + 900_000  # inside document 1, beyond the first and last 1 Mi tokens
    assert 1 << 20 < pos < int(lengths.sum()) - (1 << 20)
    corrupt_token(prefix, pos)
    check_tokens(read_index(prefix), build_tokenizer("byte"), "byte")  # the start-up scan misses it
    with pytest.raises(DataError) as e:
        verify_prefix(prefix, 257)
    msg = str(e.value)
    assert f"{prefix}.bin: document 1 (sequence 1, token 900000 of it" in msg and "token id 60000" in msg
    assert "scripts/preprocess_data.py" in msg  # the fix
    # data.verify=true runs it at dataset build time, on the same message.
    cfg = DataConfig(paths=[prefix], cache_dir=str(tmp_path / "cache"), seq_len=32, verify=True)
    with pytest.raises(DataError, match=r"document 1 \(sequence 1"):
        build_datasets(cfg, seed=1, train_samples=4, eval_samples=0, vocab_size=320)
    # The command line: exit code 2 and the message; a sound prefix passes with 0.
    (tmp_path / "small.txt").write_text("a small sound corpus " * 50)
    good = str(tmp_path / "good")
    preprocess([str(tmp_path / "small.txt")], good, "byte")
    p = subprocess.run([sys.executable, str(REPO / "scripts/preprocess_data.py"), "--verify", good, prefix],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and f"ok {good}: 1 documents" in p.stdout and "document 1 (sequence 1" in p.stderr


def test_corrupt_index_arrays_name_the_document(tmp_path):
    prefix = make_corpus(tmp_path)
    count = len(read_index(prefix).sequence_lengths)
    with open(prefix + ".idx", "r+b") as f:  # sequence pointer of document 2 off by 2 bytes
        f.seek(HEADER_BYTES + count * 4 + 2 * 8)
        ptr = np.frombuffer(f.read(8), dtype=np.int64)[0]
        f.seek(HEADER_BYTES + count * 4 + 2 * 8)
        f.write(np.int64(ptr + 2).tobytes())
    with pytest.raises(DataError, match=rf"{prefix}.idx: document 2 \(sequence 2\) points at byte"):
        verify_prefix(prefix, 257)
    with open(prefix + ".idx", "r+b") as f:  # restore; break the document boundaries instead
        f.seek(HEADER_BYTES + count * 4 + 2 * 8)
        f.write(np.int64(ptr).tobytes())
        f.seek(HEADER_BYTES + count * 12 + 8)
        f.write(np.int64(5).tobytes())
    with pytest.raises(DataError, match="document boundaries are inconsistent"):
        verify_prefix(prefix, 257)


def test_truncated_bin_names_the_pair(tmp_path):
    prefix = make_corpus(tmp_path)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"c.bin has 1000 bytes but .*c.idx describes"):
        verify_prefix(prefix, 257)
