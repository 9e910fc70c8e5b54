"""`shardwise-launch [torchrun flags] recipe=NAME key=value ...`: torchrun around shardwise.train.

Arguments that start with `-` (and the value after a flag given without `=`) go to torchrun;
`key=value` arguments are Hydra overrides for the trainer. Without --nproc-per-node it starts one
process per visible GPU, or 2 CPU processes. Without --nnodes/--rdzv-endpoint it runs --standalone.
The run directory is fixed here, once, so that every rank (and a restarted worker) writes to the
same place.

Fault tolerance (`fault_tolerance.snapshot_every > 0`): before torchrun, one snapshot manager (SMP) per node
-- on one machine, per emulated node of `parallel.ranks_per_node` ranks -- with a per-job id and secret,
addresses in <run_dir>/ft_smps.json (shardwise.fault_tolerance.smp_group). They outlive torchrun's worker
restarts (`--max-restarts R`: the restarted workers recover from them) and are stopped, segments removed,
when torchrun returns or raises. Multi-node jobs start the SMPs outside (scripts/slurm/train.sbatch) and
export SHARDWISE_FT_SMPS/SHARDWISE_FT_SECRET; the launcher then starts none.

Hang detection (`trainer.hang_timeout_s > 0`): a watchdog thread beside torchrun reads the ranks' heartbeat
files; on a hang it dumps every rank's stacks, kills the workers and the launcher exits 3 with the message
(shardwise.fault_tolerance.watchdog).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun args, trainer overrides)."""
    torchrun, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("-"):
            torchrun.append(arg)
            # `--flag value` form: the next token belongs to the flag unless it is another flag/override.
            if "=" not in arg and arg not in ("--standalone", "--no-python", "--run-path", "--no_python"):
                nxt = next(it, None)
                if nxt is not None:
                    torchrun.append(nxt)
        else:
            overrides.append(arg)
    return torchrun, overrides


def _has(flags: list[str], *names: str) -> bool:
    return any(f.split("=", 1)[0] in names for f in flags)


def build_torchrun_args(argv: Sequence[str]) -> list[str]:
    torchrun, overrides = split_args(argv)
    if not _has(torchrun, "--nproc-per-node", "--nproc_per_node"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 2
        torchrun.append(f"--nproc-per-node={n}")
    multinode = _has(torchrun, "--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--master-addr", "--master_addr")
    if not multinode and "--standalone" not in torchrun:
        torchrun.append("--standalone")
    if not any(o.split("=", 1)[0] == "run_dir" for o in overrides):
        recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "run")
        overrides.append(f"run_dir=runs/{recipe}/{time.strftime('%Y%m%d-%H%M%S')}")
    return [*torchrun, "-m", "shardwise.train", *overrides]


def _flag_value(args: list[str], *names: str) -> Optional[str]:
    """Value of a torchrun flag given as `--flag=v` or `--flag v`."""
    for i, a in enumerate(args):
        key, _, value = a.partition("=")
        if key in names:
            return value if value else (args[i + 1] if i + 1 < len(args) else None)
    return None


def world_size(torchrun_args: list[str]) -> Optional[int]:
    """nproc_per_node * nnodes when both are fixed numbers (elastic ranges like 1:4 give None)."""
    nproc = _flag_value(torchrun_args, "--nproc-per-node", "--nproc_per_node") or "1"
    nnodes = _flag_value(torchrun_args, "--nnodes") or "1"
    return int(nproc) * int(nnodes) if nproc.isdigit() and nnodes.isdigit() else None


def main(argv: Optional[Sequence[str]] = None) -> None:
    from torch.distributed.run import main as torchrun_main

    from .trainer.compose import compose_config
    from .parallel.share import check_memory_budget
    from .trainer.validate import ConfigError, validate_config

    args = build_torchrun_args(sys.argv[1:] if argv is None else argv)
    split = args.index("-m")
    print("shardwise-launch: torchrun " + " ".join(args), flush=True)
    # Fail on a bad config here, once, instead of in N workers.
    try:
        cfg, _ = compose_config(args[split + 2:])
        world = world_size(args[:split])
        if world is not None:
            validate_config(cfg, world)
            check_memory_budget(cfg, world)  # trainer.memory_budget_gib: the meta-device share of each stage
    except ConfigError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        sys.exit(2)
    restarts = _flag_value(args[:split], "--max-restarts", "--max_restarts") or "0"
    if restarts != "0" and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
        # Restarted workers must not share torchrun's rendezvous store: they would read the previous
        # incarnation's gloo/NCCL addresses from it and fail to connect (pytorch/pytorch#135712).
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        print("shardwise-launch: --max-restarts: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (workers get their own store)",
              flush=True)
    smps = start_snapshot_managers(cfg, args[:split], world)
    watchdog = start_hang_watchdog(cfg, world)
    try:
        torchrun_main(args)
    except BaseException:
        if watchdog is None or watchdog.verdict is None:
            raise
    finally:
        if watchdog is not None:
            watchdog.stop()
        if smps is not None:
            smps.stop()
    if watchdog is not None and watchdog.verdict is not None:  # it killed the hung job's workers
        from .fault_tolerance.watchdog import HANG_EXIT_CODE
        print(f"shardwise: job ended by the hang watchdog (details above and in {cfg.run_dir}/hang.txt)",
              file=sys.stderr, flush=True)
        sys.exit(HANG_EXIT_CODE)


def start_hang_watchdog(cfg, world: Optional[int]):
    """trainer.hang_timeout_s > 0: the watchdog over the ranks' heartbeat files (shardwise.fault_tolerance.watchdog)."""
    if cfg.trainer.hang_timeout_s <= 0:
        return None
    from pathlib import Path

    from .fault_tolerance.watchdog import HangWatchdog
    if world is None:  # elastic world size: the heartbeat files say who is there
        world = 0
    return HangWatchdog.start(Path(cfg.run_dir), world, cfg.trainer.hang_timeout_s)


def start_snapshot_managers(cfg, torchrun_args: list[str], world: Optional[int]):
    """One SMP per (emulated) node when snapshots are on and this is a single-machine job; else None."""
    from pathlib import Path

    from .fault_tolerance.smp_group import SMPS_ENV, SMPGroup

    if cfg.fault_tolerance.snapshot_every <= 0 or os.environ.get(SMPS_ENV):
        return None  # snapshots off, or the SMPs were started outside (multi-node job script)
    nnodes = _flag_value(torchrun_args, "--nnodes") or "1"
    if nnodes != "1" or world is None:
        print("shardwise: fault_tolerance.snapshot_every > 0 on a multi-node (or elastic) job: start one snapshot "
              "manager per node first (scripts/slurm/train.sbatch does) and export SHARDWISE_FT_SMPS and "
              "SHARDWISE_FT_SECRET", file=sys.stderr)
        sys.exit(2)
    rpn = cfg.parallel.ranks_per_node or world
    return SMPGroup.start(Path(cfg.run_dir), world // rpn, cfg.fault_tolerance.memory_budget_gib)


if __name__ == "__main__":
    main()
