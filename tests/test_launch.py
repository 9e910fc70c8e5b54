"""Launch scripts run for real: scripts/launch.sh (standalone) and the Slurm template with stand-in
`srun`/`scontrol` (one node, c10d rendezvous on 127.0.0.1), each training a few steps on 2 CPU ranks."""
import json
import os
import subprocess
from pathlib import Path

from shardwise.testing import free_port
from shardwise.testing.slurm import stand_in_slurm

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, env, timeout=240):
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def _steps(run_dir: Path):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _overrides(cache):
    return ["recipe=tiny_dense", "trainer.max_steps=4", "trainer.log_every=2", "trainer.eval_every=0",
            "data.seq_len=32", f"data.cache_dir={cache}"]


def test_launch_sh_standalone(tmp_path):
    env = {**os.environ, "NPROC_PER_NODE": "2", "RUN_DIR": str(tmp_path / "run")}
    env.pop("WORLD_SIZE", None)
    _run(["bash", str(ROOT / "scripts/launch.sh"), *_overrides(tmp_path / "cache")], tmp_path, env)
    assert _steps(tmp_path / "run") == [1, 2, 4]  # step 1 is always logged


def test_slurm_template_with_stand_in_srun(tmp_path):
    # srun on one node: drops srun's own flags, runs the task with the node's Slurm variables.
    env = {**stand_in_slurm(tmp_path / "bin"), "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    _run(["bash", str(ROOT / "scripts/slurm/train.sbatch"), *_overrides(tmp_path / "cache"),
          "model.name=with space"], tmp_path, env)
    run_dir = tmp_path / "runs/tiny_dense/slurm-4242"
    assert _steps(run_dir) == [1, 2, 4]
    assert "name: with space" in (run_dir / "config.yaml").read_text()  # overrides survive quoting
