"""Metrics sinks: metrics.jsonl, console line, wandb offline (no network), clear error without wandb."""
import json
import sys

import pytest

from shardwise.trainer.config import LoggingConfig
from shardwise.trainer.metrics import MetricsLogger, format_line


def test_jsonl_and_console_line(tmp_path, caplog):
    caplog.set_level("INFO", logger="shardwise")
    m = MetricsLogger(LoggingConfig(), tmp_path / "run", enabled=True, max_steps=2)
    m.log(1, {"loss": 2.5, "tokens_per_s": 1234.5, "step_time_s": 0.5, "mfu": 0.125})
    m.close()
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text()) == {
        "step": 1, "loss": 2.5, "tokens_per_s": 1234.5, "step_time_s": 0.5, "mfu": 0.125}
    # step/total, and the time left (from the step's own time until a second step is logged)
    assert "step 1/2 | loss 2.5000 | 1,234 tok/s | 0.500 s/step | mfu 12.50% | eta 0s" in caplog.text


def test_console_line_eta_from_the_rate_since_the_first_logged_step(tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="shardwise")
    clock = iter([100.0, 110.0, 130.0])
    monkeypatch.setattr("shardwise.trainer.metrics.time.perf_counter", lambda: next(clock))
    m = MetricsLogger(LoggingConfig(), tmp_path / "run", enabled=True, max_steps=100)
    m.log(1, {"loss": 3.0, "step_time_s": 50.0})   # warm-up step: 99 * 50 s
    m.log(11, {"loss": 2.0, "step_time_s": 1.0})   # 10 steps in 10 s since step 1: 89 s left
    m.log(31, {"loss": 1.0, "step_time_s": 1.0})   # 30 steps in 30 s: 69 s left
    m.close()
    assert "step 1/100 | loss 3.0000 | 50.000 s/step | eta 1h22m" in caplog.text
    assert "step 11/100 | loss 2.0000 | 1.000 s/step | eta 1m29s" in caplog.text
    assert "step 31/100 | loss 1.0000 | 1.000 s/step | eta 1m09s" in caplog.text


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path):
    m = MetricsLogger(LoggingConfig(wandb=True), tmp_path, enabled=False, max_steps=1)
    m.log(1, {"loss": 1.0})
    m.close()
    assert list(tmp_path.iterdir()) == []


def test_wandb_offline_needs_no_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is in the dev extra; install with pip install -e '.[dev]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    m = MetricsLogger(LoggingConfig(wandb=True, console=False), tmp_path, enabled=True, max_steps=2,
                      full_config={"model": {"name": "t"}}, run_name="offline-test")
    m.log(1, {"loss": 2.0})
    m.log(2, {"loss": 1.5})
    m.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_wandb_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'shardwise\[wandb\]' or set logging.wandb=false"):
        MetricsLogger(LoggingConfig(wandb=True), tmp_path, enabled=True, max_steps=1)


def test_format_line_skips_missing_metrics():
    assert format_line({"step": 3, "loss": 1.0, "eval_loss": None}) == "step 3 | loss 1.0000"
