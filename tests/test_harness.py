"""The multi-process harness itself: results per rank, failures and hangs reported by rank."""
import pytest
import torch
import torch.distributed as dist

from shardwise.testing import DistributedTestError, run_distributed


def _allreduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return rank, t.item()


def _rank1_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()


def _rank0_skips_collective(rank, world):
    if rank != 0:
        dist.all_reduce(torch.ones(1))  # rank 0 never joins: the others wait


def _rank1_hangs(rank, world):
    if rank == 1:
        import time
        time.sleep(600)


def test_results_in_rank_order():
    # 8 ranks on 2 cores: the largest world the suite uses.
    assert run_distributed(_allreduce, 8, timeout=90) == [(r, 36.0) for r in range(8)]


def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_rank1_raises, 2, timeout=60, pg_timeout=10)
    assert "rank 1 failed" in str(e.value) and "boom on purpose" in str(e.value)


def test_missing_peer_makes_the_waiting_rank_fail():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_rank0_skips_collective, 2, timeout=40, pg_timeout=5)
    assert "rank 1 failed" in str(e.value)


def test_stuck_rank_reported_with_its_stack():
    with pytest.raises(DistributedTestError) as e:
        run_distributed(_rank1_hangs, 2, timeout=8)
    msg = str(e.value)
    assert "rank 1 did not finish within the 8s timeout" in msg and "_rank1_hangs" in msg
