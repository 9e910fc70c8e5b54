"""scripts/gpu_check.sh + scripts/bench/gpu_check.py: the shell script parses, the orchestrator bounds every
sub-check (a hanging one is killed with its children and recorded as a timeout, a failing one with its error
tail, and the next check still runs), and the real workers run on CPU (--cpu-smoke). The GPU figures come
only from a GPU machine; the whole CPU smoke run (every check, ~8 minutes on 2 cores) is in the slow group."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts" / "bench"))
import gpu_check  # noqa: E402

FAKE_WORKERS = textwrap.dedent('''
    import argparse, json, os, subprocess, sys, time
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker"); ap.add_argument("--result"); ap.add_argument("--work"); ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args()
    if a.worker == "ok":
        json.dump({"ok": True, "details": {"criteria": {"fine": True}}}, open(a.result, "w"))
    elif a.worker == "hang":  # a child of its own that must die with it
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(a.work, "child.pid"), "w").write(str(child.pid))
        time.sleep(600)
    else:
        json.dump({"ok": False, "details": {"criteria": {"fine": True, "broken": False}}}, open(a.result, "w"))
        print("worker says: boom"); sys.exit(3)
''')


def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)


def test_every_check_is_bounded_and_recorded(tmp_path, monkeypatch):
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "gpu_check_workers.py").write_text(FAKE_WORKERS)
    monkeypatch.setattr(gpu_check, "HERE", fake)
    monkeypatch.setattr(gpu_check, "CHECKS", [gpu_check.Check("a", "ok", 60, torchrun=False),
                                              gpu_check.Check("b", "hang", 3, torchrun=False),
                                              gpu_check.Check("c", "boom", 60, torchrun=False)])
    t0 = time.monotonic()
    rc = gpu_check.main(["--out", str(tmp_path / "out"), "--budget-s", "120", "--reserve-s", "1"])
    assert rc == 1 and time.monotonic() - t0 < 60
    rep = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    checks = rep["checks"]
    assert [checks[n]["status"] for n in "abc"] == ["pass", "timeout", "fail"], checks
    assert checks["c"]["rc"] == 3 and "worker says: boom" in checks["c"]["error_tail"]
    assert checks["c"]["failed_criteria"] == ["broken"]
    assert rep["summary"] == {"fail": 1, "pass": 1, "timeout": 1}
    pid = int((tmp_path / "out" / "work" / "b" / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid), "the hanging check's child survived its timeout"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def _smoke(tmp_path, only: str) -> dict:
    rc = gpu_check.main(["--cpu-smoke", "--out", str(tmp_path), "--budget-s", "1200", "--only", only])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0, json.dumps({n: {k: c.get(k) for k in ("status", "failed_criteria", "error", "error_tail")}
                                for n, c in rep["checks"].items()}, indent=1)[-6000:]
    return rep


def test_cpu_smoke_env_and_collectives(tmp_path):
    rep = _smoke(tmp_path, "env,collectives")
    crit = rep["checks"]["collectives"]["details"]["criteria"]
    assert crit["all_to_all_single_rejects_meta"] and crit["zero_group_rejects"] and len(crit) == 12, crit
    assert rep["checks"]["env"]["details"]["apex"]["fused_rmsnorm"] is False


@pytest.mark.slow
def test_cpu_smoke_every_check(tmp_path):
    rep = _smoke(tmp_path, ",".join(c.name for c in gpu_check.CHECKS))
    assert set(rep["checks"]) == {c.name for c in gpu_check.CHECKS}
