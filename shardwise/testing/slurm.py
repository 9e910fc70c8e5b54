"""A stand-in for Slurm's `srun` and `scontrol` on one machine, so scripts/slurm/train.sbatch runs in tests."""
from __future__ import annotations

import os
from pathlib import Path


def stand_in_slurm(bin_dir: Path) -> dict[str, str]:
    """Write `scontrol` (one host, 127.0.0.1) and `srun` (drops its own flags, runs the task as node 0 of 1)
    into `bin_dir`; return the environment of a one-node allocation with that directory first on PATH."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'SLURM_NODEID=0 SLURM_NNODES=1 exec "$@"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node0", "SLURM_GPUS_ON_NODE": "2"}
