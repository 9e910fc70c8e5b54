"""Pipeline parallel's stage-to-stage traffic through the communication layer.

torch.distributed.pipelining builds the sends and receives itself: `PipelineStage.get_*_ops` return the
`dist.P2POp` lists that the schedule batches with `batch_isend_irecv`. `CheckedPipelineStage` is that stage
with every op list handed to `collectives.point_to_point` first, so pipeline traffic gets what every other
collective of the package gets: the device check (NCCL/RCCL take device tensors only) and, when the trainer
counts the pp group, its bytes (`comm_bytes.pp`: activations sent forward + gradients sent back, this rank's
sends). The ops themselves are unchanged: the schedule issues exactly what it would have.
"""
from __future__ import annotations

from torch.distributed.pipelining import PipelineStage

from . import collectives as C


class CheckedPipelineStage(PipelineStage):
    """torch's PipelineStage whose point-to-point ops pass through shardwise.comm (same constructor)."""

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        return C.point_to_point(super().get_fwd_send_ops(fwd_chunk_id), self.group)

    def get_bwd_send_ops(self, bwd_chunk_id: int):
        return C.point_to_point(super().get_bwd_send_ops(bwd_chunk_id), self.group)

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        return C.point_to_point(super().get_fwd_recv_ops(fwd_chunk_id), self.group)

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        return C.point_to_point(super().get_bwd_recv_ops(bwd_chunk_id), self.group)
