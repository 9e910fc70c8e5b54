"""Deterministic, data-parallel-sharded batches whose position is part of the training state.

The sample order is a pure function of `consumed_samples`, never of the number of processes:
optimizer step s reads dataset samples `[c, c+G)` (c = samples consumed before the step, indices
modulo len(dataset); the wrap is the next epoch, already shuffled by megatron's GPTDataset),
cut into G/m micro-batches in order, and data-parallel rank r takes the contiguous block of
A = G/(m*dp) micro-batches starting at r*A. Summing gradients over ranks and micro-batches
therefore sees the same samples for any dp size, and resuming from `consumed_samples` replays
exactly what an uninterrupted run would have read.
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

Batch = Dict[str, torch.Tensor]


def collate(samples: List[dict]) -> Batch:
    """Stack the tensor fields of megatron samples into `[micro_batch_size, ...]` tensors.

    Non-tensor fields are dropped: BlendedDataset adds a numpy scalar `dataset_id`, which would
    otherwise become a `[m]` tensor and break "every value is [m, seq_len]".
    """
    return {k: torch.stack([s[k] for s in samples]) for k, v in samples[0].items() if isinstance(v, torch.Tensor)}


def _check_sizes(global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> int:
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} and data.micro_batch_size={micro_batch_size} must be positive"
        )
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    per_step = micro_batch_size * dp_size
    if global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={global_batch_size} must be a multiple of data.micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp_size}) = {per_step}"
        )
    return global_batch_size // per_step


class _RankBatchSampler:
    """Endless index lists of this rank's micro-batches, starting at `consumed_samples`."""

    def __init__(self, n: int, g: int, m: int, dp_rank: int, a: int, consumed: int) -> None:
        self.n, self.g, self.m, self.dp_rank, self.a, self.consumed = n, g, m, dp_rank, a, consumed

    def __iter__(self) -> Iterator[List[int]]:
        step_start = self.consumed
        while True:
            first = step_start + self.dp_rank * self.a * self.m
            for j in range(self.a):
                start = first + j * self.m
                yield [(start + k) % self.n for k in range(self.m)]
            step_start += self.g


class GlobalBatchIterator:
    """Deterministic, data-parallel-sharded batches; its position is training state.

    `next_step()` returns this rank's A = G/(m*dp) micro-batches of the next optimizer step.
    `state_dict()` counts only steps already returned (not what DataLoader workers prefetched),
    so saving it with the model checkpoint makes a restart resume at exactly the next step.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        consumed_samples: int = 0,
        num_workers: int = 0,
    ) -> None:
        self.num_micro_batches = _check_sizes(global_batch_size, micro_batch_size, dp_rank, dp_size)
        if len(dataset) < 1:
            raise ValueError("GlobalBatchIterator got an empty dataset")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers = num_workers
        self.consumed_samples = int(consumed_samples)
        self._iter: Optional[Iterator[Batch]] = None
        self._loader: Optional[DataLoader] = None

    def _start(self) -> None:
        sampler = _RankBatchSampler(
            len(self.dataset), self.global_batch_size, self.micro_batch_size,
            self.dp_rank, self.num_micro_batches, self.consumed_samples,
        )
        # Workers, if any, persist for the loader's life (one endless pass); order is preserved
        # by DataLoader, so results do not depend on num_workers.
        self._loader = DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate
        )
        self._iter = iter(self._loader)

    def next_step(self) -> List[Batch]:
        """This rank's micro-batches for the next optimizer step, each dict of [micro_batch_size, seq_len] tensors."""
        if self._iter is None:
            self._start()
        batches = [next(self._iter) for _ in range(self.num_micro_batches)]
        self.consumed_samples += self.global_batch_size
        return batches

    def __iter__(self) -> Iterator[List[Batch]]:
        while True:
            yield self.next_step()

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, sd: dict) -> None:
        """Jump to `sd["consumed_samples"]`; prefetched batches of the old position are dropped."""
        consumed = sd["consumed_samples"]
        if isinstance(consumed, torch.Tensor):
            consumed = consumed.item()
        if int(consumed) < 0:
            raise ValueError(f"consumed_samples={consumed} must be >= 0")
        self.close()
        self.consumed_samples = int(consumed)

    def close(self) -> None:
        """Stop DataLoader workers (also done on garbage collection); the next step restarts them."""
        self._iter = None
        self._loader = None


def eval_batches(dataset: Dataset, *, micro_batch_size: int, num_micro_batches: int,
                 dp_rank: int, dp_size: int) -> List[Batch]:
    """This rank's share of a fixed validation set: the first `num_micro_batches * m` samples.

    Micro-batch i covers samples `[i*m, (i+1)*m)` and goes to rank `i % dp_size` (a rank may get
    none). The set does not depend on dp_size, so the evaluated loss (summed over ranks, divided by
    the summed token count) is the same whatever the number of processes. Indices wrap modulo
    len(dataset).
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches={num_micro_batches} must be >= 1")
    _check_sizes(micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)
    n = len(dataset)
    if n < 1:
        raise ValueError("eval_batches got an empty dataset")
    return [
        collate([dataset[(j * micro_batch_size + k) % n] for k in range(micro_batch_size)])
        for j in range(dp_rank, num_micro_batches, dp_size)
    ]
