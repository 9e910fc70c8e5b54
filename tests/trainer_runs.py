"""Shared by the trainer-level equivalence tests: the short-run overrides and a worker that runs the real
Trainer for several configs in one spawned process group (spawning costs more than training the tiny
models). `summarize(trainer, history)` must be a module-level function (it travels to spawned ranks)."""
import functools
from pathlib import Path

from shardwise.testing.tolerance import EQUIV_ADAM_EPS, param_tolerance


def tiny_overrides(recipe: str, cache_dir: str, *extra: str) -> list[str]:
    """5 steps of seq 64, global batch 8 in micro-batches of 2, one evaluation of 3 micro-batches at the
    end (shared unevenly by 2 ranks: the eval loss must not change), quiet logging, and AdamW's eps at
    EQUIV_ADAM_EPS (shardwise/testing/tolerance.py: with eps 1e-8 roundoff becomes O(lr))."""
    return [f"recipe={recipe}", f"data.cache_dir={cache_dir}", "trainer.max_steps=5", "trainer.log_every=1",
            "trainer.eval_every=5", "trainer.eval_iters=3", "data.seq_len=64", "data.global_batch_size=8",
            "data.micro_batch_size=2", "logging.progress_bar=false", "logging.console=false",
            f"optim.eps={EQUIV_ADAM_EPS}", *extra]


def param_tol(overrides: list[str]) -> tuple[float, float]:
    """(rtol, atol) for the final parameters of the run `overrides` describes (its optimizer, schedule and
    step count), from shardwise.testing.tolerance.param_tolerance."""
    return _param_tol(tuple(overrides))


@functools.lru_cache(maxsize=None)
def _param_tol(overrides: tuple) -> tuple[float, float]:
    from shardwise.trainer.compose import compose_config

    cfg, _ = compose_config(list(overrides))
    return param_tolerance(cfg.optim, cfg.trainer.max_steps)


def build_trainer(overrides, world, run_dir):
    """Compose and validate `overrides` for `world` ranks, set up the process group and build the real
    Trainer writing to `run_dir` (created)."""
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer
    from shardwise.trainer.config_checks import validate_config

    cfg, _ = compose_config(overrides)
    validate_config(cfg, world)
    env = init_distributed(cfg.parallel, cfg.trainer)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, env, Path(run_dir))


def fit_runs(rank, world, runs, run_dir, summarize, ablations=None):
    """For each override list: build the Trainer in <run_dir>/<i>, fit; summarize.
    `ablations`: per run, None or a shardwise.testing.ablation kind to train that run under."""
    from shardwise.testing.ablation import ablate

    out = []
    for i, overrides in enumerate(runs):
        with ablate((ablations or [None] * len(runs))[i]):
            tr = build_trainer(overrides, world, Path(run_dir, str(i)))
            out.append(summarize(tr, tr.fit()))
    return out
