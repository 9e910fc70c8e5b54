"""shardwise-launch reports a bad input as one message (field or file + fix) with exit code 2 before torchrun
starts; a failure inside the ranks is summed up once from their error reports, tracebacks in run_dir/logs."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shardwise.errors import write_report
from shardwise.launch_failures import summarize
from shardwise.trainer.data import preprocess

REPO = Path(__file__).resolve().parents[1]


def launch(args, cwd, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SHARDWISE_LAUNCHER"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "shardwise.launch", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def corpus(tmp_path: Path, name="c") -> str:
    (tmp_path / f"{name}.txt").write_text("the cat sat on the mat. " * 2000)
    (tmp_path / f"{name}2.txt").write_text("a dog ran far away. " * 2000)
    preprocess([str(tmp_path / f"{name}.txt"), str(tmp_path / f"{name}2.txt")], tmp_path / name, "byte")
    return str(tmp_path / name)


def bad_inputs(tmp_path: Path):
    good = corpus(tmp_path)
    short = corpus(tmp_path, "short")
    with open(short + ".bin", "r+b") as f:
        f.truncate(100)
    (tmp_path / "a_file").write_text("")
    return [
        (["+trainer.max_stpes=5"], "Did you mean trainer.max_steps?"),
        (["trainer.max_steps=abc"], "trainer.max_steps='abc': expected int"),
        (["trainer.precision=fp16"], "trainer.precision='fp16': expected one of fp32, bf16"),
        ([f"data.paths=[{tmp_path}/missing]"], f"{tmp_path}/missing.idx does not exist"),
        ([f"data.paths=[{short}]"], f"{short}.bin has 100 bytes but {short}.idx describes"),
        ([f"data.paths=[{good}]", "data.tokenizer=/no/such/tokenizer.json"], "no tokenizer file at '/no/such/tokenizer.json'"),
        ([f"run_dir={tmp_path}/a_file/run"], f"run_dir={tmp_path}/a_file/run: {tmp_path}/a_file is not a directory"),
        ([f"fault_tolerance.checkpoint_dir={tmp_path}/a_file/ck", "fault_tolerance.checkpoint_every=5"],
         "fault_tolerance.checkpoint_dir="),
        (["trainer.device=cuda"], "trainer.device=cuda but no CUDA device is visible"),
    ]


def test_bad_inputs_fail_before_torchrun_with_one_message(tmp_path):
    import torch

    for overrides, message in bad_inputs(tmp_path):
        if "trainer.device=cuda" in overrides and torch.cuda.is_available():
            continue
        run_dir = tmp_path / "run"
        args = ["--nproc-per-node", "2", "recipe=tiny_dense", *overrides]
        if not any(o.startswith("run_dir=") for o in overrides):
            args.append(f"run_dir={run_dir}")
        p = launch(args, tmp_path)
        assert p.returncode == 2, (overrides, p.stdout, p.stderr)
        assert message in p.stderr and p.stderr.count("shardwise:") == 1, (overrides, p.stderr)
        assert "Traceback" not in p.stderr and "torchrun" not in p.stdout, p.stdout  # torchrun never started
        assert not run_dir.exists()  # nothing created, nothing left running (the launcher has no children yet)


def _processes_mentioning(text: str) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                out.append(int(pid))
        except OSError:
            continue
    return out


def test_ranks_failing_on_corrupt_data_give_one_message_and_logs(tmp_path):
    prefix = corpus(tmp_path)
    data = np.memmap(prefix + ".bin", dtype=np.uint16, mode="r+")
    data[30_000] = 60000  # garbage in the middle of document 0
    data.flush()
    run_dir = tmp_path / "run"
    p = launch(["--nproc-per-node", "2", "recipe=tiny_dense", f"data.paths=[{prefix}]", "data.verify=true",
                "data.seq_len=32", "trainer.max_steps=2", f"data.cache_dir={tmp_path}/cache", f"run_dir={run_dir}"],
               tmp_path, timeout=240)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    msg = f"{prefix}.bin: document 0 (sequence 0, token 30000 of it"
    assert p.stderr.count(msg) == 1 and "token id 60000" in p.stderr, p.stderr
    for noise in ("Traceback", "ChildFailedError", "failed (exitcode", "Root Cause"):
        assert noise not in p.stderr + p.stdout, p.stderr
    for rank in (0, 1):  # each rank's full traceback is in its log
        log = (run_dir / "logs" / f"rank{rank}.log").read_text()
        assert "Traceback" in log and "DataError" in log and msg in log
    assert f"{run_dir}/logs/rank*.log" in p.stderr
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(run_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(run_dir)) == []  # no rank survives the launcher


def test_unknown_failure_shows_the_rank_the_error_and_its_log_tail(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank1.log").write_text("".join(f"line {i}\n" for i in range(40)) + "RuntimeError: boom\n")
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        write_report(logs, 1, e, logs / "rank1.log")
    assert summarize(logs, {1: 1}) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardwise: training failed on rank 1: RuntimeError: boom")
    assert "line 39" in err and "line 10\n" not in err and str(logs / "rank1.log") in err
    (logs / "error.rank1.json").unlink()  # died without a report: the exit code speaks
    assert summarize(logs, {0: -9}) == 1
    assert "training failed on rank 0: killed by SIGKILL" in capsys.readouterr().err
    # A known error reported by any rank wins: one message, exit code 2.
    from shardwise.errors import DiskError
    write_report(logs, 3, DiskError("run_dir=/x: full"), None)
    assert summarize(logs, {1: 1, 3: 2}) == 2
    assert capsys.readouterr().err.startswith("shardwise: run_dir=/x: full\n")


def _console_scripts() -> list[str]:
    text = (REPO / "setup.py").read_text()
    return re.findall(r'"[\w-]+=([\w.]+):main"', text)


@pytest.mark.parametrize("cmd", [["-m", m] for m in _console_scripts()]
                         + [[str(p)] for p in sorted((REPO / "scripts").glob("*.py"))]
                         + [[str(REPO / "scripts/bench/launch_errors.py")]])
def test_help_works(cmd):
    p = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stdout + p.stderr


def test_full_or_read_only_output_directories_are_refused(tmp_path, monkeypatch):
    import collections
    import shutil as _shutil

    from shardwise import preflight
    from shardwise.errors import DiskError
    from shardwise.trainer.compose import compose_config

    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: Usage(1 << 30, 1 << 30, 1 << 20))
    with pytest.raises(DiskError, match=r"run_dir=.*only 0.00 GiB free .* needs at least 0.06 GiB; free space"):
        preflight.check_writable(tmp_path / "run", "run_dir", preflight.MIN_FREE_RUN_DIR)
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: False)  # as on a read-only mount
    with pytest.raises(DiskError, match="is not writable .*read-only file system"):
        preflight.check_writable(tmp_path / "run", "run_dir", 0)
    monkeypatch.undo()
    cfg, _ = compose_config(["recipe=tiny_moe", f"fault_tolerance.checkpoint_dir={tmp_path}/ck",
                             "fault_tolerance.checkpoint_every=10"])
    free = _shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(preflight, "CHECKPOINT_BYTES_PER_PARAM", free)  # > free for any model of >= 1 parameter
    with pytest.raises(DiskError, match="one checkpoint of this model takes about"):
        preflight.check_checkpoint_space(cfg)


def test_known_error_families():
    import errno

    from shardwise.errors import as_known
    from shardwise.fault_tolerance.checkpoint import CheckpointError
    from shardwise.offload.config import OffloadConfigError
    from shardwise.trainer.data import DataError
    from shardwise.trainer.config_checks import ConfigError

    for exc, kind in ((ConfigError("c"), "config"), (DataError("d"), "data"), (CheckpointError("k"), "checkpoint"),
                      (OffloadConfigError("o"), "config")):
        assert as_known(exc) is exc and exc.kind == kind
    full = as_known(OSError(errno.ENOSPC, "No space left on device", "/r/metrics.jsonl"))
    assert full.kind == "disk" and "cannot write /r/metrics.jsonl: No space left on device" in str(full)
    missing = as_known(ModuleNotFoundError("No module named 'wandb'", name="wandb"))
    assert missing.kind == "library" and "pip install 'shardwise[wandb]'" in str(missing)
    assert as_known(RuntimeError("a bug")) is None and as_known(OSError(errno.EIO, "I/O error")) is None


def test_launch_sh_refuses_a_typo_with_one_message(tmp_path):
    env = {**os.environ, "NPROC_PER_NODE": "2", "RUN_DIR": str(tmp_path / "run"), "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run(["bash", str(REPO / "scripts/launch.sh"), "recipe=tiny_dense", "+trainer.max_stpes=5"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Did you mean trainer.max_steps?" in p.stderr and "Traceback" not in p.stderr
