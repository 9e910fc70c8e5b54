"""Fault injection for tests and demos, driven by ``FaultToleranceConfig.inject`` (config.py).

The trainer calls, on every rank, right after the snapshot of ``step`` is committed (``eng.wait_all()``)::

    maybe_inject(cfg.fault_tolerance.inject, step, rank, ranks_per_node, local_smp_client)

* ``target: trainer`` — the rank ``kill_rank``, or every rank of node ``kill_node``, SIGKILLs itself (no
  cleanup, as a crash). The node's SMP survives, so the restart finds every snapshot.
* ``target: smp`` — the first rank of the targeted node (node of ``kill_rank``, or ``kill_node``) SIGKILLs that
  node's snapshot manager (pid from its ``ping``): the node's snapshots and the parity it held are lost and
  must be rebuilt from the other nodes. The SMP must run on the same host (true for emulated nodes).
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Optional

from .config import FaultInjectConfig
from .smp_client import SMPClient

log = logging.getLogger("shardwise.ft.inject")


def target_node(inj: FaultInjectConfig, ranks_per_node: int) -> Optional[int]:
    """The node the injection hits, or None when nothing is injected."""
    if inj.kill_node is not None:
        return int(inj.kill_node)
    if inj.kill_rank is not None:
        return int(inj.kill_rank) // ranks_per_node
    return None


def maybe_inject(inj: FaultInjectConfig, step: int, rank: int, ranks_per_node: int,
                 local_smp: Optional[SMPClient] = None) -> bool:
    """Inject the configured failure if ``step`` is ``kill_step`` and this rank is concerned.

    Returns True when this rank killed its node's SMP (a trainer that kills itself does not return)."""
    if inj.kill_step is None or int(step) != int(inj.kill_step):
        return False
    node = rank // ranks_per_node
    if node != target_node(inj, ranks_per_node):
        return False
    if inj.target == "trainer":
        if inj.kill_rank is None or int(inj.kill_rank) == rank:
            log.warning("fault injection: rank %d SIGKILLs itself after step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)
        return False
    if inj.target == "smp":
        if rank % ranks_per_node != 0:
            return False
        if local_smp is None:
            raise ValueError("fault_tolerance.inject.target=smp needs the node's SMP client (local_smp=)")
        pid = int(local_smp.ping()["pid"])
        log.warning("fault injection: rank %d SIGKILLs node %d's snapshot manager (pid %d) after step %d",
                    rank, node, pid, step)
        os.kill(pid, signal.SIGKILL)
        return True
    raise ValueError(f"fault_tolerance.inject.target={inj.target!r} must be 'trainer' or 'smp'")
