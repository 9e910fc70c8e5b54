"""`shardwise-validate recipe=NAME [key=value ...] --world-size N`: compose and check a recipe for a
world size without starting anything, and print its size, FLOPs and per-rank batch layout."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .models import count_parameters, flops_per_token
from .parallel.share import budget_problem, describe, rank_shares
from .trainer.compose import compose_config, to_yaml
from .trainer.config_checks import ConfigError, dp_size, parallel_layout, validate_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--world-size", type=int, default=1, help="total processes (GPUs) of the job")
    parser.add_argument("--print-config", action="store_true", help="print the composed config")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg, recipe = compose_config(overrides)
        validate_config(cfg, args.world_size)
        shares = rank_shares(cfg, args.world_size)
        problem = budget_problem(cfg, shares)
        if problem:
            raise ConfigError(problem)
    except ConfigError as e:
        print(f"shardwise: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg))
    c = count_parameters(cfg.model)
    p, d = cfg.parallel, cfg.data
    dp = dp_size(cfg, args.world_size)
    print(f"recipe {recipe}: valid for world size {args.world_size}")
    print(f"  parameters {c.total / 1e9:.3f}B total, {c.active / 1e9:.3f}B active per token")
    print(f"  {flops_per_token(cfg.model, d.seq_len) / 1e9:.2f} GFLOPs per trained token at seq_len {d.seq_len}")
    sizes, _ = parallel_layout(p, args.world_size)
    levels = f" (pair {sizes['dp_pair']} x node {sizes['dp_node']} x inter {sizes['dp_inter']})" if sizes else ""
    print(f"  layout tp={p.tp}{' +sp' if p.sequence_parallel else ''} pp={p.pp} dp={dp}{levels} ep={p.ep}; "
          f"{d.global_batch_size // (d.micro_batch_size * dp)} "
          f"micro-batch(es) of {d.micro_batch_size} per data-parallel rank per step")
    z = cfg.zero
    extras = [f"hpZ {z.secondary_partition_level}"] if z.secondary_partition_level != "none" else []
    extras += [f"qwZ {z.quantize_weights}"] if z.quantize_weights != "none" else []
    extras += [f"qgZ {z.quantize_gradients}"] if z.quantize_gradients != "none" else []
    print(f"  ZeRO stage {z.stage}{' (' + ', '.join(extras) + ')' if extras else ''} over the data-parallel levels")
    budget = cfg.trainer.memory_budget_gib
    print(f"  model states per rank, from each pipeline stage's meta-device share"
          f"{f' (budget {budget:g} GiB)' if budget > 0 else ''}:\n{describe(shares)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
