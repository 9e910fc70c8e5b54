"""Shared by the trainer-level equivalence tests: the short-run overrides and a worker that runs the real
Trainer for several configs in one spawned process group (spawning costs more than training the tiny
models). `summarize(trainer, history)` must be a module-level function (it travels to spawned ranks)."""
from pathlib import Path


def tiny_overrides(recipe: str, cache_dir: str, *extra: str) -> list[str]:
    """5 steps of seq 64, global batch 8 in micro-batches of 2, one evaluation of 3 micro-batches at the
    end (shared unevenly by 2 ranks: the eval loss must not change), quiet logging."""
    return [f"recipe={recipe}", f"data.cache_dir={cache_dir}", "trainer.max_steps=5", "trainer.log_every=1",
            "trainer.eval_every=5", "trainer.eval_iters=3", "data.seq_len=64", "data.global_batch_size=8",
            "data.micro_batch_size=2", "logging.progress_bar=false", "logging.console=false", *extra]


def fit_runs(rank, world, runs, run_dir, summarize):
    """For each override list: compose, validate, build the Trainer in <run_dir>/<i>, fit; summarize."""
    from shardwise.trainer.compose import compose_config
    from shardwise.trainer.distributed import init_distributed
    from shardwise.trainer.trainer import Trainer
    from shardwise.trainer.validate import validate_config

    out = []
    for i, overrides in enumerate(runs):
        cfg, _ = compose_config(overrides)
        validate_config(cfg, world)
        env = init_distributed(cfg.parallel, cfg.trainer)
        d = Path(run_dir, str(i))
        d.mkdir(parents=True, exist_ok=True)
        tr = Trainer(cfg, env, d)
        out.append(summarize(tr, tr.fit()))
    return out
