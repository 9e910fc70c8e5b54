"""`shardwise-launch [torchrun flags] recipe=NAME key=value ...`: torchrun around shardwise.train.

Arguments that start with `-` (and the value after a flag given without `=`) go to torchrun;
`key=value` arguments are Hydra overrides for the trainer. Without --nproc-per-node it starts one
process per visible GPU, or 2 CPU processes. Without --nnodes/--rdzv-endpoint it runs --standalone.
The run directory is fixed here, once, so that every rank (and a restarted worker) writes to the
same place. Later issues start the per-node services (snapshot manager) here before the trainers.
"""
from __future__ import annotations

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
    except ConfigError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        sys.exit(2)
    torchrun_main(args)


if __name__ == "__main__":
    main()
