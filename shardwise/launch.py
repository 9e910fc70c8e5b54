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

Before torchrun starts, the launcher composes and validates the config and checks the data files, the device
and the output directories (shardwise.preflight); torch is imported only after the torch-free checks, so a
typo or a missing file is reported in about a second. A failed job ends with one message (exit code 2 for a
known error; shardwise.launch_failures), the ranks' full tracebacks are in <run_dir>/logs/rank<R>.log.

Hang detection (`trainer.hang_timeout_s > 0`): a watchdog thread beside torchrun reads the ranks' heartbeat
files; on a hang it dumps every rank's stacks, kills the workers, and the job ends with its message (through
the same one-message path) and exit code 3 (shardwise.fault_tolerance.watchdog).
"""
from __future__ import annotations

import os
import signal
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


USAGE = """usage: shardwise-launch [torchrun flags] recipe=NAME [group.key=value ...]

Train with torchrun. Arguments starting with `-` go to torchrun (e.g. --nproc-per-node 4, --nnodes 2
--rdzv-endpoint host:29500, --max-restarts 1); key=value arguments are config overrides
(e.g. trainer.max_steps=50 data.paths=[data/corpus] run_dir=runs/x).
Without --nproc-per-node: one process per visible GPU, else 2 CPU processes; without
--nnodes/--rdzv-endpoint: --standalone. Outputs go to run_dir (default runs/<recipe>/<time>);
rank logs to <run_dir>/logs/. Recipes: recipes/recipe/*.yaml; check a layout with shardwise-validate.
Exit codes: 0 done, 2 a bad input (one message naming the field or file and the fix), 1 a failure.
"""


def with_run_dir(overrides: list[str]) -> list[str]:
    """`overrides` with a `run_dir=` (fixed here, once, for every rank and restarted worker)."""
    if any(o.split("=", 1)[0].lstrip("+") == "run_dir" for o in overrides):
        return overrides
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), "run")
    return [*overrides, f"run_dir=runs/{recipe}/{time.strftime('%Y%m%d-%H%M%S')}"]


def build_torchrun_args(argv: Sequence[str]) -> list[str]:
    torchrun, overrides = split_args(argv)
    overrides = with_run_dir(overrides)
    if not _has(torchrun, "--nproc-per-node", "--nproc_per_node"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 2
        torchrun.append(f"--nproc-per-node={n}")
    multinode = _has(torchrun, "--nnodes", "--rdzv-endpoint", "--rdzv_endpoint", "--master-addr", "--master_addr")
    if not multinode and "--standalone" not in torchrun:
        torchrun.append("--standalone")
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
    from .errors import ShardwiseError, clear_reports
    from .preflight import check_inputs
    from .trainer.compose import compose_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE, end="")
        sys.exit(0)
    # Fail on bad input here, once, instead of in N workers: torch-free checks first (seconds).
    try:
        overrides = with_run_dir(split_args(argv)[1])
        cfg, _ = compose_config(overrides)
        run_dir = cfg.run_dir
        check_inputs(cfg, run_dir)
        args, cfg = _checked_with_torch(argv[:], overrides, cfg)
    except ShardwiseError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        sys.exit(2)
    split = args.index("-m")
    world = world_size(args[:split])
    print("shardwise-launch: torchrun " + " ".join(args), flush=True)
    restarts = _flag_value(args[:split], "--max-restarts", "--max_restarts") or "0"
    if restarts != "0" and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in os.environ:
        # Restarted workers must not share torchrun's rendezvous store: they would read the previous
        # incarnation's gloo/NCCL addresses from it and fail to connect (pytorch/pytorch#135712).
        os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        print("shardwise-launch: --max-restarts: TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (workers get their own store)",
              flush=True)
    from pathlib import Path

    from .launch_failures import run_torchrun
    from .trainer.rank_logs import LAUNCHER_ENV

    log_dir = Path(run_dir) / "logs"
    clear_reports(log_dir)  # an earlier launch into this run_dir (resume) must not speak for this one
    os.environ[LAUNCHER_ENV] = "1"
    smps = start_snapshot_managers(cfg, args[:split], world)
    watchdog = start_hang_watchdog(cfg, world)
    from torch.distributed.elastic.multiprocessing.api import SignalException

    code = 0
    try:
        code = run_torchrun(args, log_dir)
    except SignalException as e:  # SIGTERM/SIGINT: torchrun forwarded it and waited for the workers' clean stop
        code = 128 + int(e.sigval)  # 130 (SIGINT) / 143 (SIGTERM), as shells and schedulers expect
        print(f"shardwise-launch: stopped by {signal.Signals(e.sigval).name} (exit {code})", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C before torchrun took over the signal handlers
        code = 128 + signal.SIGINT
    finally:
        if watchdog is not None:
            watchdog.stop()
        if smps is not None:
            smps.stop()
    if watchdog is not None and watchdog.verdict is not None:  # it killed the hung job's workers
        from .fault_tolerance.watchdog import HANG_EXIT_CODE
        sys.exit(HANG_EXIT_CODE)
    sys.exit(code)


def start_hang_watchdog(cfg, world: Optional[int]):
    """trainer.hang_timeout_s > 0: the watchdog over the ranks' heartbeat files (shardwise.fault_tolerance.watchdog)."""
    if cfg.trainer.hang_timeout_s <= 0:
        return None
    from pathlib import Path

    from .fault_tolerance.watchdog import FR_BUFFER_SIZE, HangWatchdog
    # The workers inherit it: torch's flight recorder then keeps each process group's last collectives, which
    # the watchdog has every rank dump next to its stack (run_dir/flight_recorder).
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", str(FR_BUFFER_SIZE))
    if world is None:  # elastic world size: the heartbeat files say who is there
        world = 0
    return HangWatchdog.start(Path(cfg.run_dir), world, cfg.trainer.hang_timeout_s)


def _checked_with_torch(argv: list[str], overrides: list[str], cfg):
    """(torchrun args, cfg) after the checks that need torch: the default process count, the cross-field
    validation for the world size, the memory budget, the device and the checkpoint space."""
    from .parallel.share import check_memory_budget
    from .preflight import check_checkpoint_space, check_device
    from .trainer.config_checks import validate_config

    torchrun, _ = split_args(argv)
    args = build_torchrun_args([*torchrun, *overrides])
    world = world_size(args[:args.index("-m")])
    if world is not None:
        validate_config(cfg, world)
        check_memory_budget(cfg, world)  # trainer.memory_budget_gib: the meta-device share of each stage
    check_device(cfg)
    check_checkpoint_space(cfg)
    return args, cfg


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
