"""Entry point: `torchrun [...] -m shardwise.train recipe=NAME key=value ...` (or `shardwise-launch`).

Order matters: the config is composed and validated for the world size *before* any process group
exists, so a bad value fails fast on every rank with the same message instead of hanging a job.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .trainer.compose import compose_config, to_yaml
from .trainer.distributed import init_distributed, shutdown, world_from_env
from .parallel.share import check_memory_budget
from .trainer import rank_logs
from .trainer.config_checks import validate_config

log = logging.getLogger("shardwise")


def resolve_run_dir(run_dir: Optional[str], recipe: str) -> Path:
    """The run directory, identical on every rank without communication: the configured one, else
    runs/<recipe>/<torchrun run id> (shared by all ranks of a torchrun job), else a timestamp for a
    plain single process."""
    if run_dir:
        return Path(run_dir).expanduser()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID") or time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / recipe / run_id


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    for noisy in ("megatron", "megatron.core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    rank_logs.attach()  # basicConfig(force=True) dropped the file handler of <run_dir>/logs/rank<R>.log


def run(overrides: Sequence[str]) -> list[dict]:
    """Compose, validate, train; returns rank-local metric records. Raises ConfigError on bad config."""
    rank, world, _, _ = world_from_env()
    setup_logging(rank)
    # SIGTERM (preemption) or SIGINT (Ctrl-C): every rank stops after the step in which any rank asked
    # (Trainer.stop_agreed), writes the checkpoint of that step and exits 0, without a KeyboardInterrupt
    # traceback. A signal during start-up is kept and acted on at step 1. Under torchrun each worker gets the
    # terminal's SIGINT and the agent's forwarded one: only the first is logged.
    stop: dict = {}

    def on_stop(signum, frame):
        if "signal" not in stop:
            stop["signal"] = signal.Signals(signum).name
            log.info("%s received: finishing the current step, then writing a checkpoint and stopping", stop["signal"])
        if "trainer" in stop:
            stop["trainer"].stop_requested = True
            stop["trainer"].stop_signal = stop["signal"]

    previous = {s: signal.signal(s, on_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(overrides, world, stop)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _run(overrides: Sequence[str], world: int, stop: dict) -> list[dict]:
    cfg, recipe = compose_config(overrides)
    validate_config(cfg, world)
    check_memory_budget(cfg, world)  # before the real process group: it plays ranks on a fake one

    env = init_distributed(cfg.parallel, cfg.trainer)
    from .trainer.trainer import Trainer  # heavy imports (megatron datasets) after validation

    run_dir = resolve_run_dir(cfg.run_dir, recipe)
    rank_logs.start(run_dir, env.rank)  # no-op when main() already opened it from the run_dir override
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        log.info("run_dir: %s (recipe %s, %d process(es), backend %s, device %s)",
                 run_dir, recipe, env.world_size, env.backend or "none", env.device)
    trainer = Trainer(cfg, env, run_dir, run_name=f"{recipe}-{run_dir.name}")

    stop["trainer"] = trainer
    if "signal" in stop:
        trainer.stop_requested, trainer.stop_signal = True, stop["signal"]
    try:
        history = trainer.fit()
    finally:
        trainer.close()  # the process leaves with os._exit (no atexit): remove swap files here
    return history  # the run summary (Trainer.fit) already named the last step, its loss and the files


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = 0
    rank = world_from_env()[0]
    rank_logs.start(rank_logs.run_dir_from_overrides(argv), rank)
    try:
        run(argv)
    except Exception as e:
        # A known error (ShardwiseError, a full disk, a missing package): one message, exit code 2; anything
        # else exit code 1. The traceback goes to <run_dir>/logs/rank<R>.log (shardwise.trainer.rank_logs).
        code = rank_logs.report_failure(e, rank)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        shutdown()
    # gloo sometimes aborts in interpreter teardown after destroy_process_group(); the work is done
    # and flushed, so leave without running it.
    os._exit(code)


if __name__ == "__main__":
    main()
