"""A metrics write that fails (disk full) warns once and training goes on; metrics.jsonl never holds a
half line."""
from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from shardwise.trainer.config import LoggingConfig
from shardwise.trainer.jsonl import JsonlWriter
from shardwise.trainer.metrics import MetricsLogger


class FillsUp:
    """A real file that takes `room` more bytes, then writes what fits and raises ENOSPC (as a full disk)."""

    def __init__(self, path, room):
        self._f = open(path, "ab", buffering=0)
        self.room = room

    def write(self, data):
        if len(data) > self.room:
            self._f.write(data[: self.room])  # the partial write a full disk leaves behind
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def test_disk_full_drops_whole_lines_and_warns_once(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path, file=FillsUp(path, room=60))
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        results = [w.write({"step": i, "loss": 1.0 / (i + 1)}) for i in range(1, 6)]
    assert results[0] is True and results[-1] is False
    lines = path.read_text().splitlines(keepends=True)
    assert lines and all(line.endswith("\n") for line in lines)
    assert [json.loads(line)["step"] for line in lines] == [i for i, ok in zip(range(1, 6), results) if ok]
    assert sum("cannot write" in r.message for r in caplog.records) == 1 and w.dropped == results.count(False)
    w._f.room = 10_000  # space is back: writing resumes
    assert w.write({"step": 6}) and json.loads(path.read_text().splitlines()[-1]) == {"step": 6}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_dev_full_warns_and_continues(caplog):
    w = JsonlWriter("/dev/full")
    with caplog.at_level(logging.WARNING, logger="shardwise"):
        assert not w.write({"step": 1}) and not w.write({"step": 2})
    assert sum("No space left" in r.message or "cannot write" in r.message for r in caplog.records) == 1
    w.close()


def test_metrics_logger_keeps_logging_when_the_file_fails(tmp_path, caplog):
    m = MetricsLogger(LoggingConfig(progress_bar=False), tmp_path, enabled=True, max_steps=3)
    m.log(1, {"loss": 2.0})
    m._file._f.close()
    m._file._f = FillsUp(tmp_path / "metrics.jsonl", room=5)
    with caplog.at_level(logging.INFO, logger="shardwise"):
        m.log(2, {"loss": 1.5})  # no exception: the console line still comes
        m.log(3, {"loss": 1.0})
    assert any(r.message.startswith("step 3") for r in caplog.records)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    m.close()
