"""Model weights out of a durable DCP checkpoint, one tensor at a time, in a plain process (no process group).

    src = resolve_source("runs/tiny_moe/x")           # a run dir, a checkpoint_dir, or one step_* directory
    src.checkpoint, src.config                        # the newest committed checkpoint, the run's ShardwiseConfig
    w = DCPWeights(src.checkpoint); w.tensor("layers.0.attn.wq.weight")

`shardwise-export` and `shardwise-generate` read checkpoints this way, and `trainer.init_from=CHECKPOINT`
through `DCPInit` (each rank reads the tensors of its own parameters only and keeps its slice). A tensor is
read with a DCP load whose state dict holds that key alone: DCP's planner then reads only that key's byte
ranges from the data files, so the memory held is one tensor (one layer's routed experts), never the model
plus its optimizer state, which the same files hold.

Where a run's model config comes from: `config.yaml` of the run directory (written by rank 0 at start). For a
bare checkpoint directory it is looked for in the directories above it (run_dir/checkpoints/step_N ->
run_dir/config.yaml); `--config` names it otherwise.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..models.init import ParamInit
from ..trainer.config import ModelConfig, ShardwiseConfig
from .checkpoint import CheckpointError, check_model_keys, latest_checkpoint, read_metadata

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def is_checkpoint(path: Union[str, Path]) -> bool:
    """A committed DCP checkpoint directory (its `.metadata` is written last)."""
    return (Path(path) / ".metadata").is_file()


def newest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The committed checkpoint of `directory` with the highest step: `step_<N>` directories (the durable
    checkpointer's names), else any committed sub-directory ending in a number."""
    found = latest_checkpoint(directory)
    if found is not None:
        return found
    d = Path(directory)
    if not d.is_dir():
        return None
    numbered = [(int(m.group(1)), p) for p in d.iterdir() if (m := _TRAILING_NUMBER.search(p.name)) and is_checkpoint(p)]
    return max(numbered)[1] if numbered else None


def load_run_config(path: Union[str, Path]) -> ShardwiseConfig:
    """The typed config of a run's config.yaml (the schema's defaults fill fields the file lacks)."""
    from omegaconf import OmegaConf
    base = OmegaConf.structured(ShardwiseConfig)
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.load(str(path))))
    except Exception as e:
        raise CheckpointError(f"{path}: not a shardwise run config ({type(e).__name__}: {e}); give the "
                              "config.yaml of the run that wrote the checkpoint with --config") from e


@dataclass
class Source:
    checkpoint: Path
    """The committed DCP checkpoint directory."""
    config: ShardwiseConfig
    """The config of the run that wrote it."""
    config_path: Path


def _config_above(path: Path) -> Optional[Path]:
    for d in [path, *path.resolve().parents][:4]:
        if (d / "config.yaml").is_file():
            return d / "config.yaml"
    return None


def resolve_source(source: Union[str, Path], config: Optional[Union[str, Path]] = None) -> Source:
    """The checkpoint and run config of `source`: a committed checkpoint directory, a directory of them
    (fault_tolerance.checkpoint_dir), or a run directory (its checkpoints/, else the checkpoint_dir its
    config.yaml names). Errors name the path and what to give instead."""
    p = Path(source).expanduser()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: give a run directory (with config.yaml), a checkpoint "
                              "directory (fault_tolerance.checkpoint_dir) or one of its step_* directories")
    cfg_path = Path(config) if config else None
    if is_checkpoint(p):
        ckpt = p
    else:
        run_cfg = p / "config.yaml" if (p / "config.yaml").is_file() else None
        ckpt = newest_checkpoint(p) or newest_checkpoint(p / "checkpoints")
        if ckpt is None and run_cfg is not None:
            ckpt_dir = load_run_config(run_cfg).fault_tolerance.checkpoint_dir
            ckpt = newest_checkpoint(ckpt_dir) if ckpt_dir else None
        if ckpt is None:
            raise CheckpointError(f"{p}: no committed checkpoint (a step_* directory with .metadata) in it, in "
                                  f"{p / 'checkpoints'} or in the run's fault_tolerance.checkpoint_dir; train with "
                                  "checkpoints on, or give the checkpoint directory itself")
        cfg_path = cfg_path or run_cfg
    cfg_path = cfg_path or _config_above(ckpt.parent)
    if cfg_path is None or not Path(cfg_path).is_file():
        raise CheckpointError(f"checkpoint {ckpt}: no config.yaml found in the directories above it; pass the "
                              "run's config.yaml (run_dir/config.yaml) with --config")
    return Source(ckpt, load_run_config(cfg_path), Path(cfg_path))


class DCPWeights:
    """The model tensors of one checkpoint (names and global shapes from its metadata), read one at a time."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        for k, m in self.metadata.state_dict_metadata.items():
            if not k.startswith(("optim.", "train.")) and isinstance(m, TensorStorageMetadata):
                self.shapes[k], self.dtypes[k] = tuple(m.size), m.properties.dtype

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Names and global shapes equal to `expected` (CheckpointError naming the keys otherwise)."""
        check_model_keys(self.metadata, expected, self.path)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise CheckpointError(f"checkpoint {self.path} has no model tensor {name!r}")
        out = {name: torch.empty(self.shapes[name], dtype=self.dtypes[name])}
        try:
            dcp.load(out, checkpoint_id=str(self.path), no_dist=True)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {self.path}: reading {name} failed ({type(e).__name__}: {e}); its "
                                  "data files are corrupt or incomplete") from e
        return out[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every model tensor (for a model that one process holds anyway: shardwise-generate)."""
        return {k: self.tensor(k) for k in self.shapes}


def checkpoint_of(path: Union[str, Path]) -> Optional[Path]:
    """The checkpoint `trainer.init_from` means when it names a DCP checkpoint (or a run/checkpoint directory
    holding one); None when it names something else (a Hugging Face directory)."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return None
    if is_checkpoint(p):
        return p
    return newest_checkpoint(p) or newest_checkpoint(p / "checkpoints")


class DCPInit(ParamInit):
    """`trainer.init_from=CHECKPOINT`: a drop-in for ParamInit returning this rank's slice of each parameter
    from a durable checkpoint (weights only: the optimizer starts fresh, at step 0). Names and global shapes
    are checked against the model config before anything is built."""

    def __init__(self, path: Union[str, Path], cfg: ModelConfig, tp: tuple[int, int] = (0, 1),
                 ep: tuple[int, int] = (0, 1)):
        super().__init__(cfg, seed=0, tp=tp, ep=ep)
        self.weights = DCPWeights(path)
        from ..models.transformer import build_meta_model
        expected = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
        try:
            self.weights.check(expected)
        except CheckpointError as e:
            raise CheckpointError(f"trainer.init_from: {e}") from None

    def __call__(self, name: str, param: nn.Parameter) -> torch.Tensor:
        index = self._split(name, param)
        return self.weights.tensor(name).float()[tuple(index)].contiguous()

    @torch.no_grad()
    def load_buffers(self, model: nn.Module) -> None:
        """Persistent buffers the checkpoint holds (the routers' balancing bias), after the model built them."""
        keys = set(model.state_dict().keys())
        for name, buf in model.named_buffers():
            if name in keys and name in self.weights.shapes:
                buf.copy_(self.weights.tensor(name).to(buf.device, buf.dtype))
