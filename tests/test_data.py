"""Data pipeline: tokenizers, preprocessing, megatron-core datasets, bundled corpus, sampler."""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shardwise.trainer.config import DataConfig
from shardwise.trainer.data import (
    DataError,
    GlobalBatchIterator,
    build_datasets,
    build_tokenizer,
    ensure_bundled_corpus,
    eval_batches,
    preprocess,
)

REPO = Path(__file__).resolve().parents[1]
EOD = 256

DOCS_A = ["alpha beta gamma " * 6, "the quick brown fox jumps over the lazy dog\n" * 3, "aaa", "héllo wörld ✓ " * 4]
WORDS = "the cat sat on mat dog ran far away and then came back home".split()


# ---------------------------------------------------------------------------------------- helpers

def read_docs(prefix):
    """Documents of a .bin/.idx pair as lists, read through megatron's own IndexedDataset.

    Megatron quirk: the arrays it returns are views into its mmap, which its __del__ closes, so
    they must be copied out while the IndexedDataset is alive (else: segfault).
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    docs = [ds[i].tolist() for i in range(len(ds))]
    dtype = ds.index.dtype
    del ds
    return docs, dtype


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def make_prefix(tmp_path, name, docs, tokenizer="byte"):
    stats = preprocess([write_jsonl(tmp_path / f"{name}.jsonl", docs)], tmp_path / name, tokenizer)
    return str(tmp_path / name), stats


def letter_docs(letter, n=40, length=90):
    """Documents made of one letter (plus spaces), so samples reveal their source prefix."""
    return [((letter * (3 + i % 5) + " ") * length)[: length + i] for i in range(n)]


def hf_tokenizer_json(path, words=WORDS, eos="</s>", extra=0):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0}
    if eos:
        vocab[eos] = 1
    for w in list(words) + [f"w{i}" for i in range(extra)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def cfg(tmp_path, paths=(), **kw):
    kw.setdefault("seq_len", 32)
    return DataConfig(paths=list(paths), cache_dir=str(tmp_path / "cache"), **kw)


class IndexDataset(torch.utils.data.Dataset):
    """Sample i is tokens == i everywhere: batches reveal exactly which indices they hold."""

    def __init__(self, n, seq_len=4):
        self.n, self.seq_len = n, seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        t = torch.full((self.seq_len,), i, dtype=torch.long)
        return {"tokens": t, "labels": t + 1, "loss_mask": torch.ones(self.seq_len), "position_ids": torch.arange(self.seq_len)}


def ids_of(batches):
    return [int(x) for b in batches for x in b["tokens"][:, 0]]


# ------------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip_and_megatron_fields():
    tok = build_tokenizer("byte")
    text = "héllo ✓\n"
    ids = tok.tokenize(text)
    assert ids == list(text.encode()) and max(ids) < 256
    assert tok.detokenize(ids + [EOD]) == text
    assert (tok.vocab_size, tok.eod, tok.eos) == (257, EOD, EOD)
    assert json.dumps(tok.unique_identifiers)  # megatron json-dumps it into its cache hash
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tok, MegatronTokenizerBase)


def test_hf_tokenizer_json(tmp_path):
    path = hf_tokenizer_json(tmp_path / "tokenizer.json")
    tok = build_tokenizer(path)
    assert tok.eod == 1 and tok.vocab_size == len(set(WORDS)) + 2
    ids = tok.tokenize("the cat sat")
    assert ids == [2, 3, 4] and tok.detokenize(ids) == "the cat sat"
    assert build_tokenizer(str(tmp_path)).eod == 1  # the folder holding tokenizer.json works too


def test_hf_tokenizer_eod_from_tokenizer_config_and_missing_eod(tmp_path):
    (tmp_path / "a").mkdir()
    path = hf_tokenizer_json(tmp_path / "a" / "tokenizer.json", eos="<|im_end|>")
    with pytest.raises(DataError, match=r"tokenizer\.json.*no end-of-document token"):
        build_tokenizer(path)
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert build_tokenizer(path).eod == 1
    path = hf_tokenizer_json(tmp_path / "noeos.json", eos=None)
    with pytest.raises(DataError, match="noeos.json"):
        build_tokenizer(path)


def test_missing_tokenizers_package_says_pip_install(tmp_path, monkeypatch):
    path = hf_tokenizer_json(tmp_path / "tokenizer.json")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(DataError, match="pip install tokenizers"):
        build_tokenizer(path)


def test_bad_tokenizer_path():
    with pytest.raises(DataError, match="data.tokenizer"):
        build_tokenizer("/nonexistent/tokenizer.json")


# ------------------------------------------------------------------------------------- preprocess

def test_preprocess_text_and_jsonl_byte_round_trip(tmp_path):
    (tmp_path / "a.txt").write_text(DOCS_A[0], encoding="utf-8")
    (tmp_path / "b.txt").write_text(DOCS_A[1], encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", DOCS_A[2:] + [""], key="body")
    stats = preprocess([str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")], tmp_path / "out" / "p", "byte", json_key="body")
    docs, dtype = read_docs(tmp_path / "out" / "p")
    tok = build_tokenizer("byte")
    expected = [tok.tokenize(d) + [EOD] for d in DOCS_A]  # a.txt, b.txt (sorted glob), then c.jsonl
    assert docs == expected and dtype == np.uint16
    assert (stats.documents, stats.skipped_empty, stats.tokens) == (4, 1, sum(map(len, expected)))
    assert not [p for p in os.listdir(tmp_path / "out") if ".tmp" in p]


def test_preprocess_hf_tokenizer_round_trip(tmp_path):
    tok_path = hf_tokenizer_json(tmp_path / "tokenizer.json")
    docs = ["the cat sat on the mat", "dog ran far away", "and then came back home the cat"]
    (tmp_path / "one.txt").write_text(docs[0])
    write_jsonl(tmp_path / "rest.jsonl", docs[1:])
    preprocess([tmp_path / "one.txt", tmp_path / "rest.jsonl"], tmp_path / "hf", tok_path)
    tok = build_tokenizer(tok_path)
    got, dtype = read_docs(tmp_path / "hf")
    assert got == [tok.tokenize(d) + [tok.eod] for d in docs] and dtype == np.uint16
    assert got[0][:3] == [2, 3, 4]


def test_preprocess_large_vocab_uses_int32_and_workers_keep_order(tmp_path):
    tok_path = hf_tokenizer_json(tmp_path / "big.json", extra=70000)
    docs = [f"w{i} w{69999 - i} cat" for i in range(50)]
    s1 = preprocess([write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "big1", tok_path)
    preprocess([tmp_path / "d.jsonl"], tmp_path / "big2", tok_path, workers=2)
    got, dtype = read_docs(tmp_path / "big1")
    assert s1.dtype == "int32" and dtype == np.int32
    assert max(got[1]) > 65536
    assert (tmp_path / "big1.bin").read_bytes() == (tmp_path / "big2.bin").read_bytes()


def test_preprocess_cli_and_input_errors(tmp_path, capsys):
    write_jsonl(tmp_path / "d.jsonl", ["x y", "z"], key="content")
    cli = runpy.run_path(str(REPO / "scripts" / "preprocess_data.py"))["main"]
    assert cli(["--input", str(tmp_path / "*.jsonl"), "--output-prefix", str(tmp_path / "cli"), "--json-key", "content"]) == 0
    assert read_docs(tmp_path / "cli")[0] == [[120, 32, 121, EOD], [122, EOD]]
    assert cli(["--input", str(tmp_path / "d.jsonl"), "--output-prefix", str(tmp_path / "x")]) == 2
    assert "d.jsonl:1" in capsys.readouterr().err  # default key `text` is missing on line 1
    with pytest.raises(DataError, match=r"d\.jsonl:1: no field 'body'.*'content'.*--json-key"):
        preprocess([tmp_path / "d.jsonl"], tmp_path / "y", "byte", json_key="body")
    with pytest.raises(DataError, match="matches no file"):
        preprocess([str(tmp_path / "*.nothing")], tmp_path / "z", "byte")
    with pytest.raises(DataError, match="no such file"):
        preprocess([str(tmp_path / "missing.txt")], tmp_path / "z", "byte")


# ---------------------------------------------------------------------------------------- datasets

def check_samples(ds, seq_len, n=20):
    for i in range(0, len(ds), max(1, len(ds) // n)):
        s = ds[i]
        assert {"tokens", "labels", "loss_mask", "position_ids"} <= set(s)
        for k in ("tokens", "labels", "loss_mask", "position_ids"):
            assert s[k].shape == (seq_len,), k
        assert torch.equal(s["labels"][:-1], s["tokens"][1:])
        assert torch.equal(s["position_ids"], torch.arange(seq_len))


def test_build_datasets_weighted_blend_of_two_prefixes(tmp_path):
    a, _ = make_prefix(tmp_path, "a", letter_docs("a"))
    b, _ = make_prefix(tmp_path, "b", letter_docs("b"))
    c = cfg(tmp_path, ["0.75", a, "0.25", b], split="90,10,0")
    train, valid = build_datasets(c, seed=3, train_samples=400, eval_samples=40, vocab_size=320)
    assert len(train) >= 400 and len(valid) >= 40
    check_samples(train, 32)
    check_samples(valid, 32)
    letters = {0: ord("a"), 1: ord("b")}
    ids = [int(train[i]["dataset_id"]) for i in range(len(train))]
    assert abs(ids.count(0) / len(ids) - 0.75) < 0.02
    for i in range(0, 200, 7):  # every sample holds only its source's letter, spaces and EOD
        s = train[i]
        assert set(s["tokens"].tolist()) <= {letters[ids[i]], 32, EOD}
    # Same seed, same samples (second call is a megatron cache hit); another seed reshuffles.
    again, _ = build_datasets(c, seed=3, train_samples=400, eval_samples=40, vocab_size=320)
    assert all(torch.equal(train[i]["tokens"], again[i]["tokens"]) for i in range(0, 400, 37))
    other, _ = build_datasets(c, seed=4, train_samples=400, eval_samples=40, vocab_size=320)
    assert not all(torch.equal(train[i]["tokens"], other[i]["tokens"]) for i in range(0, 400, 37))


@pytest.mark.timeout(60)
def test_build_datasets_unweighted_blend_eod_mask_and_no_eval(tmp_path):
    a, _ = make_prefix(tmp_path, "a", letter_docs("a", n=12))
    b, _ = make_prefix(tmp_path, "b", letter_docs("b", n=12))
    # 12 documents with split 969,30,1 leave the test split empty: megatron would loop forever
    # asked for 0 samples of it, so this also guards that the test split is skipped.
    train, valid = build_datasets(cfg(tmp_path, [a, b], seq_len=16, eod_mask_loss=True), seed=1,
                                  train_samples=50, eval_samples=0, vocab_size=257)
    assert valid is None and len(train) == 50
    check_samples(train, 16)
    s = next(train[i] for i in range(len(train)) if (train[i]["tokens"] == EOD).any())
    assert torch.equal(s["loss_mask"] == 0, s["tokens"] == EOD)


def test_build_datasets_with_initialized_process_group(tmp_path):
    import torch.distributed as dist

    a, _ = make_prefix(tmp_path, "a", letter_docs("a"))
    b, _ = make_prefix(tmp_path, "b", letter_docs("b"))
    c = cfg(tmp_path, ["1", a, "1", b])
    plain, _ = build_datasets(c, seed=5, train_samples=100, eval_samples=8, vocab_size=257)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        grouped, _ = build_datasets(c, seed=5, train_samples=100, eval_samples=8, vocab_size=257)
        corpus, _ = build_datasets(cfg(tmp_path), seed=5, train_samples=10, eval_samples=8, vocab_size=257)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(plain[i]["tokens"], grouped[i]["tokens"]) for i in range(100))
    assert len(corpus) >= 10


def _two_rank_pipeline(rank, world, cache_dir):
    c = DataConfig(cache_dir=cache_dir, seq_len=24, global_batch_size=8, micro_batch_size=2)
    train, valid = build_datasets(c, seed=7, train_samples=64, eval_samples=8, vocab_size=320)
    it = GlobalBatchIterator(train, global_batch_size=8, micro_batch_size=2, dp_rank=rank, dp_size=world)
    steps = [it.next_step() for _ in range(2)]
    ev = eval_batches(valid, micro_batch_size=2, num_micro_batches=2, dp_rank=rank, dp_size=world)
    return [torch.cat([b["tokens"] for b in s]) for s in steps], torch.cat([b["tokens"] for b in ev])


def test_two_ranks_build_corpus_once_and_split_batches(tmp_path):
    from shardwise.testing import run_distributed

    results = run_distributed(_two_rank_pipeline, 2, str(tmp_path / "cache"), timeout=120)
    train, _ = build_datasets(DataConfig(cache_dir=str(tmp_path / "cache"), seq_len=24), seed=7,
                              train_samples=64, eval_samples=8, vocab_size=320)
    for step in range(2):
        got = torch.cat([results[r][0][step] for r in range(2)])
        assert torch.equal(got, torch.stack([train[i]["tokens"] for i in range(step * 8, step * 8 + 8)]))
    assert not torch.equal(results[0][1], results[1][1])  # ranks evaluate different samples


# ---------------------------------------------------------------------------------- bundled corpus

def test_bundled_corpus_builds_once_and_is_reused(tmp_path):
    from pydoc_data.topics import topics

    prefix = ensure_bundled_corpus(str(tmp_path))
    assert prefix == str(tmp_path / "corpus" / "pydoc_topics_byte" / "text_document")
    docs, _ = read_docs(prefix)
    assert len(docs) == len(topics)
    first = sorted(topics)[0]
    assert docs[0] == list(topics[first].encode()) + [EOD]
    stamp = {p: os.stat(prefix + p).st_mtime_ns for p in (".bin", ".idx")}
    assert ensure_bundled_corpus(str(tmp_path)) == prefix
    assert {p: os.stat(prefix + p).st_mtime_ns for p in (".bin", ".idx")} == stamp
    # Corrupt (truncated) files are detected and rebuilt.
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    ensure_bundled_corpus(str(tmp_path))
    assert read_docs(prefix)[0] == docs
    assert [p for p in os.listdir(tmp_path / "corpus") if p != "pydoc_topics_byte"] == []


def test_empty_paths_use_bundled_corpus_and_need_byte_tokenizer(tmp_path):
    train, valid = build_datasets(cfg(tmp_path, seq_len=64), seed=1, train_samples=100, eval_samples=16, vocab_size=320)
    check_samples(train, 64)
    from pydoc_data.topics import topics

    alltext = "\x00".join(topics.values()).encode()
    for i in (0, 1, 50):  # samples are byte slices of Python's help texts, cut at EOD
        ids = train[i]["tokens"].tolist()
        pieces = bytes(255 if t == EOD else t for t in ids).split(b"\xff")
        assert all(p in alltext for p in pieces) and len(ids) == 64
    tok_path = hf_tokenizer_json(tmp_path / "tokenizer.json")
    with pytest.raises(DataError, match=r"data\.paths is empty.*data\.tokenizer"):
        build_datasets(cfg(tmp_path, tokenizer=tok_path), seed=1, train_samples=10, eval_samples=0, vocab_size=320)


# ---------------------------------------------------------------------------------------- errors

def test_missing_idx_or_bin_names_the_file(tmp_path):
    a, _ = make_prefix(tmp_path, "a", letter_docs("a"))
    with pytest.raises(DataError, match=r"nothere\.idx does not exist.*preprocess_data\.py"):
        build_datasets(cfg(tmp_path, [str(tmp_path / "nothere")]), seed=1, train_samples=10, eval_samples=0, vocab_size=320)
    os.remove(a + ".bin")
    with pytest.raises(DataError, match=r"a\.bin does not exist"):
        build_datasets(cfg(tmp_path, [a]), seed=1, train_samples=10, eval_samples=0, vocab_size=320)


def test_truncated_bin_is_reported(tmp_path):
    a, _ = make_prefix(tmp_path, "a", letter_docs("a"))
    with open(a + ".bin", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"a\.bin has 1000 bytes"):
        build_datasets(cfg(tmp_path, [a]), seed=1, train_samples=10, eval_samples=0, vocab_size=320)


def test_dtype_and_vocab_mismatches(tmp_path):
    a, _ = make_prefix(tmp_path, "a", letter_docs("a"))  # uint16, byte ids
    big = hf_tokenizer_json(tmp_path / "big.json", extra=70000)
    with pytest.raises(DataError, match=r"a\.idx: tokens are stored as uint16.*70016 ids"):
        build_datasets(cfg(tmp_path, [a], tokenizer=big), seed=1, train_samples=10, eval_samples=0, vocab_size=80000)
    with pytest.raises(DataError, match=r"model\.vocab_size=200.*257"):
        build_datasets(cfg(tmp_path, [a]), seed=1, train_samples=10, eval_samples=0, vocab_size=200)
    mid = hf_tokenizer_json(tmp_path / "mid.json", extra=400)  # ids up to ~415: not byte data
    m, _ = make_prefix(tmp_path, "m", [" ".join(f"w{i}" for i in range(300, 400))] * 20, tokenizer=mid)
    with pytest.raises(DataError, match=r"m\.bin contains token id \d+ but data\.tokenizer='byte'"):
        build_datasets(cfg(tmp_path, [m]), seed=1, train_samples=10, eval_samples=0, vocab_size=1000)


def test_seq_len_longer_than_split(tmp_path):
    a, _ = make_prefix(tmp_path, "a", ["short doc"] * 30)  # 300 tokens, 30 docs
    with pytest.raises(DataError, match=r"data\.seq_len=512 .*train split.*data\.split"):
        build_datasets(cfg(tmp_path, [a], seq_len=512), seed=1, train_samples=10, eval_samples=0, vocab_size=320)
    with pytest.raises(DataError, match=r"data\.seq_len=64 .*validation split.*data\.split='969,30,1'"):
        build_datasets(cfg(tmp_path, [a], seq_len=64), seed=1, train_samples=10, eval_samples=4, vocab_size=320)
    with pytest.raises(DataError, match=r"data\.split='100,0,0'.*validation split weight 0"):
        build_datasets(cfg(tmp_path, [a], split="100,0,0"), seed=1, train_samples=10, eval_samples=4, vocab_size=320)
    with pytest.raises(DataError, match=r"data\.split='abc'"):
        build_datasets(cfg(tmp_path, [a], split="abc"), seed=1, train_samples=10, eval_samples=0, vocab_size=320)


@pytest.mark.parametrize("paths, message", [
    (["0.7", "A", "0.3"], r"3 entries.*even number"),
    (["0.7", "A", "heavy", "B"], r"data\.paths\[2\]='heavy' is not a number"),
    (["A", "0.3", "B"], r"data\.paths\[1\]='0\.3' looks like a weight"),
    (["-1", "A"], r"blend weights must be positive"),
])
def test_malformed_paths(tmp_path, paths, message):
    a, _ = make_prefix(tmp_path, "a", letter_docs("a"))
    paths = [a if p in ("A", "B") else p for p in paths]
    with pytest.raises(DataError, match=message):
        build_datasets(cfg(tmp_path, paths), seed=1, train_samples=10, eval_samples=0, vocab_size=320)


# ----------------------------------------------------------------------------------------- sampler

def test_global_step_covers_consecutive_indices_and_wraps():
    it = GlobalBatchIterator(IndexDataset(10), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1)
    steps = [ids_of(it.next_step()) for _ in range(3)]
    assert steps == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert it.state_dict() == {"consumed_samples": 12}
    b = GlobalBatchIterator(IndexDataset(10), global_batch_size=4, micro_batch_size=2, dp_rank=0, dp_size=1).next_step()
    assert len(b) == 2 and all(v.shape[0] == 2 for mb in b for v in mb.values())


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_union_over_dp_ranks_equals_single_rank(dp_size):
    ds, G, m = IndexDataset(37), 16, 2
    ref = GlobalBatchIterator(ds, global_batch_size=G, micro_batch_size=m, dp_rank=0, dp_size=1)
    ranks = [GlobalBatchIterator(ds, global_batch_size=G, micro_batch_size=m, dp_rank=r, dp_size=dp_size)
             for r in range(dp_size)]
    for _ in range(5):  # 80 samples: wraps the 37-sample dataset twice
        expected = ref.next_step()
        per_rank = [it.next_step() for it in ranks]
        assert all(len(mb) == G // (m * dp_size) for mb in per_rank)
        got = [mb for mbs in per_rank for mb in mbs]  # rank 0's block, then rank 1's, ...
        assert len(got) == len(expected)
        for x, y in zip(got, expected):
            assert all(torch.equal(x[k], y[k]) for k in y)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact(tmp_path, num_workers):
    train, _ = build_datasets(cfg(tmp_path, seq_len=16), seed=2, train_samples=200, eval_samples=0, vocab_size=257)
    kw = dict(global_batch_size=8, micro_batch_size=2, dp_rank=1, dp_size=2, num_workers=num_workers)
    straight = GlobalBatchIterator(train, **kw)
    full = [straight.next_step() for _ in range(8)]

    first = GlobalBatchIterator(train, **kw)
    for _ in range(5):
        first.next_step()
    state = first.state_dict()
    assert state == {"consumed_samples": 40}  # what was returned, not what workers prefetched
    resumed = GlobalBatchIterator(train, **kw, consumed_samples=state["consumed_samples"])
    reloaded = GlobalBatchIterator(train, **kw)
    reloaded.next_step()  # started elsewhere, workers running: load_state_dict must reposition
    reloaded.load_state_dict(state)
    for step in range(5, 8):
        for it in (resumed, reloaded, first):
            for x, y in zip(it.next_step(), full[step]):
                assert all(torch.equal(x[k], y[k]) for k in y)


def test_batch_size_not_divisible_names_global_batch_size():
    with pytest.raises(ValueError, match=r"data\.global_batch_size=10 .*micro_batch_size.*\(2\).*\(4\)"):
        GlobalBatchIterator(IndexDataset(8), global_batch_size=10, micro_batch_size=2, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        GlobalBatchIterator(IndexDataset(8), global_batch_size=8, micro_batch_size=2, dp_rank=4, dp_size=4)


def test_eval_batches_fixed_and_split_like_training():
    ds = IndexDataset(100)
    whole = eval_batches(ds, micro_batch_size=2, num_micro_batches=6, dp_rank=0, dp_size=1)
    assert ids_of(whole) == list(range(12))
    for dp in (2, 3, 4):  # the set is global: ranks share its micro-batches (unevenly at dp=4)
        per_rank = [eval_batches(ds, micro_batch_size=2, num_micro_batches=6, dp_rank=r, dp_size=dp) for r in range(dp)]
        assert sorted(i for batches in per_rank for i in ids_of(batches)) == list(range(12))
        assert [len(b) for b in per_rank] == [len(range(r, 6, dp)) for r in range(dp)]
    again = eval_batches(ds, micro_batch_size=2, num_micro_batches=6, dp_rank=0, dp_size=1)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(whole, again))

