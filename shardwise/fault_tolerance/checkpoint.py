"""Durable, asynchronous training checkpoints in `torch.distributed.checkpoint` (DCP) format (docs/fault_tolerance.md).

The trainer (every rank; collective where noted)::

    ckpt = DurableCheckpointer.build(trainer)  # None when nothing is saved or resumed (build's docstring);
                                               # collective: creates the gloo group the background saves use
    ckpt.resume(trainer)        # the checkpoint trainer.resume / resume_from pick (shardwise.fault_tolerance.resume):
                                # saved at ANY world size, dp levels, ZeRO stage or tp (DCP reshards: each rank
                                # reads the boxes of its new ranges)
    ckpt.after_step(trainer)    # each step: when step % checkpoint_every == 0, copy the state to host memory
                                # (the only blocking part) and dcp.async_save it from a background thread
    ckpt.save_final(trainer)    # trainer.save_final: end of training or a stop; waits until it committed
    ckpt.close()                # end of training: wait for the save in flight

After each commit, rank 0 deletes all but the newest ``trainer.keep_last`` checkpoints (0 = keep all).

At most one save is in flight: the next save (and close) first waits for it. The background save's planning
collectives run on their own gloo group (``dist.new_group(backend="gloo")``): DCP async_save needs a CPU
backend, and collectives on the training groups from another thread could interleave with the training's own.

Layout on disk: ``<checkpoint_dir>/step_<8 digits>/`` holding DCP's files; DCP writes ``.metadata`` last
(after every rank's data), so a directory with ``.metadata`` is committed and one without is an interrupted
save (ignored by :func:`latest_checkpoint`). Keys: see :mod:`shardwise.fault_tolerance.training_state`.

Export (a plain single process, no process group): ``torch.distributed.checkpoint.load(model.state_dict(),
checkpoint_id=dir)`` works as is on an un-parallelised model; :func:`load_model_state_dict` returns the full
model tensors (checking names and shapes first), :func:`load_into_model` loads them into a model, and
:func:`export_model` writes them with ``torch.save``. For Hugging Face: ``shardwise.models.hf_io.save_hf_checkpoint(
load_model_state_dict(dir), cfg.model, out_dir)``. Everything (optimizer too) as one torch.save file:
``torch.distributed.checkpoint.format_utils.dcp_to_torch_save(dir, file)``.
"""
from __future__ import annotations

import copy
import logging
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.staging import AsyncStager

from ..errors import ShardwiseError
from ..comm import collectives as C
from ..parallel.zero.state import FORMAT as ZERO_FORMAT, sharded_state_dict
from .resume import ResumeError, checkpoint_dir, latest_checkpoint, prune, resolve, step_dir  # noqa: F401 (re-exported)
from .snapshot import capture_rng_state, restore_rng_state
from .training_state import global_shape, sharded

log = logging.getLogger("shardwise.ft.checkpoint")
# A job without a process group saves/loads with no_dist=True on purpose; DCP warns about it on every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized, assuming the "
                        "intent is to (save|load) in a single process", category=UserWarning)
FORMAT = "shardwise.ckpt/1"
_TRAIN_KEYS = ("train.step", "train.consumed_samples", "train.lr_scheduler", "train.param_groups", "train.layout")


class CheckpointError(ShardwiseError, RuntimeError):
    """A checkpoint that cannot be used; the message names the directory/key and the fix."""

    kind = "checkpoint"


def read_metadata(path: Union[str, Path]) -> Metadata:
    """DCP metadata of checkpoint `path`, with clear errors for a missing, incomplete or corrupt directory."""
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {p} does not exist (or is not a directory): give the step_* directory "
                              f"of a durable checkpoint (fault_tolerance.checkpoint_dir/step_<N>)")
    if not (p / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {p} has no .metadata: the save was interrupted before it committed, or this "
                              f"is not a DCP checkpoint directory; resume from an older step_* directory or delete {p}")
    try:
        return dcp.FileSystemReader(str(p)).read_metadata()
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {p}: {p / '.metadata'} is unreadable ({type(e).__name__}: {e}); the file is "
                              f"corrupt: delete or move {p} to resume from the previous checkpoint") from e


def _model_expectations(model: torch.nn.Module, tp_size: int) -> dict[str, tuple[int, ...]]:
    """{model key: GLOBAL shape} for parameters and persistent buffers of a (tensor-parallel) model."""
    out = {}
    for n, p in model.named_parameters():
        out[n] = global_shape(tuple(p.shape), getattr(p, "tp_shard_dim", None), tp_size)
    keys = set(model.state_dict().keys())
    for n, b in model.named_buffers():
        if n in keys:
            out[n] = tuple(b.shape)
    return out


def check_model_keys(md: Metadata, expected: dict[str, tuple[int, ...]], path: Union[str, Path]) -> None:
    """Every model key present with the same global shape, and no model key the model lacks."""
    sdm = md.state_dict_metadata
    saved = {k for k in sdm if not k.startswith(("optim.", "train."))}
    missing, unexpected = sorted(set(expected) - saved), sorted(saved - set(expected))
    bad = [f"{k}: checkpoint {tuple(sdm[k].size)} vs model {tuple(s)}" for k, s in expected.items()
           if k in sdm and isinstance(sdm[k], TensorStorageMetadata) and tuple(sdm[k].size) != tuple(s)]
    if missing or unexpected or bad:
        what = "; ".join(x for x in (f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}" if missing else "",
                                     f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
                                     if unexpected else "", "shape mismatch " + ", ".join(bad[:5]) if bad else "") if x)
        raise CheckpointError(f"checkpoint {path} is of a different model: {what}. Fix: use the model config the "
                              f"checkpoint was saved with, or point fault_tolerance.checkpoint_dir elsewhere")


class _Staged(AsyncStager):
    """The state dict handed to dcp.async_save is already a host-memory copy (DurableCheckpointer._stage): no
    second copy (DCP's DefaultStager would also deep-copy every tensor, and it cannot copy ShardedTensors)."""

    _synchronize_after_execute = False

    def stage(self, state_dict, **kwargs):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _why(e: BaseException) -> str:
    """One line per failing rank (CheckpointException's own text carries every rank's whole traceback)."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(x).__name__}: {x}" for r, x in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


def _blob(obj) -> bytes:
    # Non-tensor state travels pickled: DCP would flatten a dict into one key per entry.
    return pickle.dumps(copy.deepcopy(obj))


class DurableCheckpointer:
    """Asynchronous DCP saves of a Trainer's whole state and resume at any tp x dp layout (module docstring)."""

    def __init__(self, directory: Union[str, Path], every: int, trainer, keep_last: int = 0):
        dims = trainer.dims
        if dims.pp > 1 or dims.ep > 1:
            raise CheckpointError(f"durable checkpoints support tp x dp layouts (any ZeRO stage); parallel.pp={dims.pp}, "
                                  f"parallel.ep={dims.ep}: set fault_tolerance.checkpoint_dir=null for this layout")
        self.directory, self.every, self.keep_last = Path(directory), int(every), int(keep_last)
        self.cfg, self.run_dir = trainer.cfg, trainer.run_dir
        self.have: Optional[Path] = None  # the checkpoint of the trainer's current state (saved or loaded)
        self.engine, self.model = trainer.engine, trainer.raw_model
        self.tp_rank, self.tp_size = dims.my_coords["tp"], dims.tp
        self.tp_dim = {n: getattr(p, "tp_shard_dim", None) for n, p in self.model.named_parameters()}
        self.dist = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.dist else 0
        self.group = dist.new_group(backend="gloo") if self.dist else None  # collective (module docstring)
        self.layout = {"format": FORMAT, "world_size": dist.get_world_size() if self.dist else 1, "tp": dims.tp,
                       "dp": dims.dp, "dp_levels": (dims.dp_pair, dims.dp_node, dims.dp_inter),
                       "zero_stage": self.engine.stage, "param_dtype": str(self.engine.param_dtype),
                       "model": trainer.cfg.model.name}
        # CO2 (shardwise/parallel/co2/state.py): the inner AdamW moments differ between nodes (keys per node).
        self.co2 = getattr(trainer, "co2", None)
        self.replica = f"replica{dims.my_coords['dp_inter']}." if self.co2 is not None else ""
        if self.co2 is not None:
            self.layout["co2"] = {"workers": self.co2.workers, "local_steps": self.co2.tau}
        self._host: dict[str, torch.Tensor] = {}
        self._future, self._inflight = None, None
        self.last_blocked_s = 0.0  # seconds the last save() blocked the caller (host copy + submit)

    @classmethod
    def build(cls, trainer) -> Optional["DurableCheckpointer"]:
        """A checkpointer in fault_tolerance.checkpoint_dir (default <run_dir>/checkpoints), or None when nothing
        is to be saved or looked for (checkpoint_every=0, save_final=false, resume=never, no resume_from). On a
        layout the checkpoint does not cover (pp > 1, ep > 1) the defaults (final save, auto resume) are skipped
        with one log line; what the user asked for explicitly is refused by validate_config before this."""
        cfg = trainer.cfg
        ft, t = cfg.fault_tolerance, cfg.trainer
        explicit = bool(ft.checkpoint_dir or ft.checkpoint_every > 0 or t.resume_from or t.resume.value == "must")
        if not (explicit or t.save_final or t.resume.value == "auto"):
            return None
        dims = trainer.dims
        if not explicit and (dims.pp > 1 or dims.ep > 1):
            if trainer.env.is_main and t.save_final:  # (nothing to auto-resume from: none can have been written)
                what = " and ".join(f"parallel.{n}={v}" for n, v in (("pp", dims.pp), ("ep", dims.ep)) if v > 1)
                log.warning("no final checkpoint for this run: durable checkpoints do not support %s yet "
                            "(trainer.save_final=false silences this)", what)
            return None
        return cls(checkpoint_dir(cfg, trainer.run_dir), ft.checkpoint_every, trainer, t.keep_last)

    # ------------------------------------------------------------------ save
    def _stage(self, key: str, src: torch.Tensor) -> torch.Tensor:
        buf = self._host.get(key)
        if buf is None or buf.shape != src.shape or buf.dtype != src.dtype:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=src.device.type == "cuda")
            self._host[key] = buf
        buf.copy_(src, non_blocking=src.device.type == "cuda")
        return buf

    def state_dict(self, trainer) -> dict:
        """This rank's DCP state dict of the trainer's state, staged in (reused) host buffers."""
        zsd = sharded_state_dict(self.engine, clone=False)
        out: dict = {}
        for name, e in zsd["params"].items():
            lo, hi = e["flat_range"]
            for key, field in ((name, "master"), (f"optim.{self.replica}{name}.exp_avg", "exp_avg"),
                               (f"optim.{self.replica}{name}.exp_avg_sq", "exp_avg_sq")):
                if field in e:
                    out[key] = sharded(self._stage(key, e[field]), lo, hi, e["global_shape"], self.tp_dim.get(name),
                                       self.tp_rank, self.tp_size)
            if "step" in e:
                out[f"optim.{name}.step"] = torch.tensor(e["step"], dtype=torch.float32)
        if self.co2 is not None:
            from ..parallel.co2.state import dcp_entries
            out.update(dcp_entries(self.co2, self._stage, self._sharded))
        keys = set(self.model.state_dict().keys())
        for n, b in self.model.named_buffers():
            if n in keys:
                out[n] = self._stage(n, b.detach())
        if self.engine.device.type == "cuda":
            torch.cuda.current_stream(self.engine.device).synchronize()  # the non-blocking device-to-host copies
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.engine.optimizer.param_groups]
        out.update({"train.step": _blob(trainer.step), "train.consumed_samples": _blob(trainer.data.consumed_samples),
                    "train.lr_scheduler": _blob(trainer.scheduler.state_dict()), "train.param_groups": _blob(groups),
                    "train.layout": _blob({**self.layout, "step": trainer.step}),
                    f"train.rng.rank{self.rank}": _blob(capture_rng_state())})
        ef = zsd.get("error_feedback")
        if ef:  # qgZ residuals: per rank and per layout, like the RNG state (training_state docstring)
            out[f"train.zero_ef.rank{self.rank}"] = _blob(
                {**ef, "residuals": {k: v.detach().cpu() for k, v in ef["residuals"].items()}})
        return out

    def _sharded(self, flat, lo, hi, name, local_shape):
        return sharded(flat, lo, hi, local_shape, self.tp_dim.get(name), self.tp_rank, self.tp_size)

    def _moment_key(self, sdm, name: str, field: str) -> str:
        """This node's CO2 key, else the synchronous run's, else node 0's (a CO2 checkpoint in a synchronous run)."""
        keys = [f"optim.{self.replica}{name}.{field}", f"optim.{name}.{field}", f"optim.replica0.{name}.{field}"]
        return next((k for k in keys if k in sdm), keys[0])

    def save(self, trainer) -> Path:
        """Start an asynchronous save of step ``trainer.step``; returns its directory once the state is in host
        memory (the save in flight before, if any, is waited for first)."""
        self.wait()
        t0 = time.perf_counter()
        path = step_dir(self.directory, trainer.step)
        if self.rank == 0:
            # Re-saving a step: un-commit the old copy first, so a crash while its files are overwritten leaves
            # an uncommitted directory rather than a committed mix. Other ranks write only after the save's
            # planning collective, which rank 0 joins after this.
            (path / ".metadata").unlink(missing_ok=True)
        sd = self.state_dict(trainer)
        self._future = dcp.async_save(sd, checkpoint_id=str(path), process_group=self.group,
                                      async_stager=_Staged(), no_dist=not self.dist)
        self._inflight = path
        self.last_blocked_s = time.perf_counter() - t0
        return path

    def after_step(self, trainer) -> Optional[Path]:
        if self.every > 0 and trainer.step % self.every == 0:
            return self.save(trainer)
        return None

    def wait(self) -> Optional[Path]:
        """Wait for the save in flight (raising CheckpointError if it failed); returns its directory."""
        fut, path, self._future, self._inflight = self._future, self._inflight, None, None
        if fut is None:
            return None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"asynchronous checkpoint save to {path} failed: {_why(e)}. Check that "
                                  f"fault_tolerance.checkpoint_dir={self.directory} is writable with free space") from e
        self.have = path
        if self.rank == 0:
            log.info("durable checkpoint committed: %s", path)
            removed = prune(self.directory, self.keep_last)
            if removed:
                log.info("trainer.keep_last=%d: removed %s", self.keep_last, ", ".join(p.name for p in removed))
        return path

    def save_final(self, trainer) -> Path:
        """Save step ``trainer.step`` unless the checkpoint of that state exists already; wait until it
        committed (collective). Returns its directory."""
        if self._inflight is not None and self._inflight == step_dir(self.directory, trainer.step):
            return self.wait()
        self.wait()
        if self.have == step_dir(self.directory, trainer.step):
            return self.have
        self.save(trainer)
        return self.wait()

    def close(self) -> None:
        self.wait()

    # ------------------------------------------------------------------ load
    def resume(self, trainer) -> Optional[Path]:
        """Load the checkpoint the resume rules pick (rank 0 decides: shardwise.fault_tolerance.resume) into
        ``trainer``; None for a fresh start. CheckpointError on every rank when there must be one and is none."""
        found: list = [None]
        if self.rank == 0:
            from .trainer_hooks import first_incarnation
            try:
                path, what, warn = resolve(self.cfg, self.run_dir, restarted=not first_incarnation())
                (log.warning if warn else log.info)("durable checkpoint: %s", what)
                found = [("ok", str(path or ""))]
            except ResumeError as e:
                found = [("error", str(e))]
        if self.dist:
            C.broadcast_object_list(found, src=0, group=self.group)
        kind, value = found[0]
        if kind == "error":
            raise CheckpointError(value)
        if not value:
            return None
        self.load(trainer, value)
        return Path(value)

    def load(self, trainer, path: Union[str, Path]) -> None:
        """Load checkpoint ``path`` (saved at any tp x dp layout / ZeRO stage) into ``trainer`` (collective)."""
        path = Path(path)
        md = read_metadata(path)
        sdm = md.state_dict_metadata
        if "train.layout" not in sdm:
            raise CheckpointError(f"checkpoint {path} has no train.layout: not a shardwise training checkpoint "
                                  "(model-only DCP directories load with load_into_model)")
        check_model_keys(md, _model_expectations(self.model, self.tp_size), path)
        zsd = sharded_state_dict(self.engine, clone=False)
        req: dict = {k: None for k in _TRAIN_KEYS}
        rng_key = f"train.rng.rank{self.rank}"
        req[rng_key if rng_key in sdm else "train.rng.rank0"] = None
        ef_key = f"train.zero_ef.rank{self.rank}"
        if ef_key in sdm:
            req[ef_key] = None
        bufs: dict[tuple[str, str], torch.Tensor] = {}
        for name, e in zsd["params"].items():
            lo, hi = e["flat_range"]
            for key, field in ((name, "master"), (self._moment_key(sdm, name, "exp_avg"), "exp_avg"),
                               (self._moment_key(sdm, name, "exp_avg_sq"), "exp_avg_sq")):
                if key in sdm:
                    b = bufs[(name, field)] = torch.empty(hi - lo, dtype=torch.float32)
                    req[key] = sharded(b, lo, hi, e["global_shape"], self.tp_dim.get(name), self.tp_rank, self.tp_size)
            if f"optim.{name}.step" in sdm:
                req[f"optim.{name}.step"] = torch.zeros((), dtype=torch.float32)
        keys = set(self.model.state_dict().keys())
        mbufs = {n: b for n, b in self.model.named_buffers() if n in keys}
        req.update({n: torch.empty(b.shape, dtype=b.dtype) for n, b in mbufs.items()})
        co2_bufs: dict = {}
        if self.co2 is not None:
            from ..parallel.co2.state import dcp_request
            co2_req, co2_bufs = dcp_request(self.co2, sdm, self._sharded)
            req.update(co2_req)
        try:
            dcp.load(req, checkpoint_id=str(path), process_group=self.group, no_dist=not self.dist)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise CheckpointError(f"checkpoint {path}: reading failed ({_why(e)}); its data files are "
                                  f"corrupt or incomplete: delete or move {path} to resume from the previous one") from e
        layout = pickle.loads(req["train.layout"])
        same = {k: layout.get(k) for k in self.layout} == self.layout
        params = {}
        for name, e in zsd["params"].items():
            ent = {"global_shape": e["global_shape"], "flat_range": e["flat_range"], "master": bufs[(name, "master")]}
            if (name, "exp_avg") in bufs:
                ent.update(exp_avg=bufs[(name, "exp_avg")], exp_avg_sq=bufs[(name, "exp_avg_sq")],
                           step=float(req[f"optim.{name}.step"]))
            params[name] = ent
        zero_state = {"format": ZERO_FORMAT, "param_groups": pickle.loads(req["train.param_groups"]), "params": params}
        if same and req.get(ef_key) is not None:  # another layout: the engine starts its residuals at zero
            zero_state["error_feedback"] = pickle.loads(req[ef_key])
        self.engine.load_sharded_state_dict(zero_state)
        if self.co2 is not None:
            from ..parallel.co2.state import load_dcp
            try:
                load_dcp(self.co2, req, co2_bufs, path)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        with torch.no_grad():
            for n, b in mbufs.items():
                b.copy_(req[n])
        trainer.scheduler.load_state_dict(pickle.loads(req["train.lr_scheduler"]))
        trainer.data.load_state_dict({"consumed_samples": pickle.loads(req["train.consumed_samples"])})
        trainer.step = pickle.loads(req["train.step"])
        restore_rng_state(pickle.loads(req[rng_key if rng_key in sdm else "train.rng.rank0"]))
        self.have = path
        if self.rank == 0:
            log.info("durable checkpoint: state from %s (step %d, saved at %s)%s", path, trainer.step,
                     {k: layout.get(k) for k in ("world_size", "tp", "dp", "dp_levels", "zero_stage")},
                     "" if same else "; resharded to this job's layout")
        if rng_key not in sdm:
            log.warning("durable checkpoint %s has no RNG state of rank %d (saved by a smaller job): it takes rank 0's",
                        path, self.rank)


# ---------------------------------------------------------------------- plain single-process export
def load_model_state_dict(path: Union[str, Path], model: Optional[torch.nn.Module] = None) -> dict[str, torch.Tensor]:
    """Full model tensors (original names, global shapes; fp32 master weights) of checkpoint `path`, read in a
    plain process (no process group). With `model` (un-parallelised), its names and shapes are checked first."""
    md = read_metadata(path)
    sdm = md.state_dict_metadata
    if model is not None:
        check_model_keys(md, {k: tuple(v.shape) for k, v in model.state_dict().items()}, path)
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in sdm.items()
          if not k.startswith(("optim.", "train.")) and not isinstance(m, BytesStorageMetadata)}
    try:
        dcp.load(sd, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"checkpoint {path}: reading failed ({_why(e)}); its data files are "
                              f"corrupt or incomplete") from e
    return sd


def load_into_model(model: torch.nn.Module, path: Union[str, Path]) -> torch.nn.Module:
    """Load checkpoint `path`'s weights into an un-parallelised `model` (names and shapes checked)."""
    sd = load_model_state_dict(path, model)
    model.load_state_dict(sd)
    return model


def export_model(path: Union[str, Path], out_file: Union[str, Path]) -> Path:
    """Write checkpoint `path`'s model weights as a plain ``torch.save`` state dict (loadable with torch.load)."""
    out = Path(out_file)
    torch.save(load_model_state_dict(path), out)
    return out


def state_numel(md: Metadata) -> int:
    """Elements of every tensor in a checkpoint (for reports)."""
    return sum(math.prod(m.size) for m in md.state_dict_metadata.values() if isinstance(m, TensorStorageMetadata))
