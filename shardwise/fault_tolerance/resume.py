"""Where a run's durable checkpoints go and which one it starts from (``trainer.resume`` / ``trainer.resume_from``).

Torch-free on purpose: the launcher runs :func:`resume_problems` before torchrun starts, so ``trainer.resume=must``
with nothing to resume from fails in seconds, with the path, instead of after N workers built their models.

Rules (docs/fault_tolerance.md, "Final checkpoint and resume"):

* the checkpoint directory is ``fault_tolerance.checkpoint_dir``, else ``<run_dir>/checkpoints``;
* ``trainer.resume_from=PATH``: a ``step_*`` directory (that checkpoint) or a directory of them (its newest
  committed one); given explicitly, a PATH with nothing committed is an error whatever ``trainer.resume`` says;
* ``auto``: the newest committed checkpoint of the checkpoint directory, else a fresh start (logged; a warning
  when ``fault_tolerance.checkpoint_dir`` was given but does not exist: a typo would otherwise train from 0);
* ``must``: like auto, but nothing found is an error naming the directory;
* ``never``: a fresh start even if checkpoints exist (logged) -- for the job's first start: a worker restarted
  by torchrun (``--max-restarts``) resumes as with auto, or it would throw away the job's own progress.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Union

from ..choices import Choice

_STEP_DIR = re.compile(r"^step_(\d+)$")


class ResumeMode(Choice):
    """``trainer.resume``: a choice Enum (shardwise.choices) so that Hydra refuses any other value when the config
    is composed, while it still compares equal to its string (``cfg.trainer.resume == "must"``)."""

    auto = "auto"
    never = "never"
    must = "must"


class ResumeError(RuntimeError):
    """Nothing to resume from where the config says there must be; the message names the path and the fix."""


def step_dir(directory: Union[str, Path], step: int) -> Path:
    return Path(directory) / f"step_{step:08d}"


def committed(directory: Union[str, Path]) -> list[tuple[int, Path]]:
    """``(step, path)`` of the committed (``.metadata`` present) ``step_*`` directories, oldest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in d.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file())


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The committed ``step_*`` directory with the highest step, or None."""
    found = committed(directory)
    return found[-1][1] if found else None


def checkpoint_dir(cfg, run_dir: Optional[Union[str, Path]] = None) -> Optional[Path]:
    """``fault_tolerance.checkpoint_dir``, else ``<run_dir>/checkpoints`` (None when neither is known)."""
    if cfg.fault_tolerance.checkpoint_dir:
        return Path(cfg.fault_tolerance.checkpoint_dir).expanduser()
    run_dir = run_dir if run_dir is not None else cfg.run_dir
    return Path(run_dir).expanduser() / "checkpoints" if run_dir else None


def _mode(cfg) -> ResumeMode:
    m = cfg.trainer.resume
    return m if isinstance(m, ResumeMode) else ResumeMode(str(m))


def _from_path(path: Path) -> Path:
    """The checkpoint ``trainer.resume_from`` names, or ResumeError."""
    if _STEP_DIR.match(path.name) and path.is_dir():
        if (path / ".metadata").is_file():
            return path
        raise ResumeError(f"trainer.resume_from={path}: this checkpoint has no .metadata (its save was interrupted "
                          "before it committed): give an older step_* directory or its parent directory")
    newest = latest_checkpoint(path)
    if newest is None:
        what = "does not exist" if not path.exists() else "holds no committed step_* checkpoint"
        raise ResumeError(f"trainer.resume_from={path} {what}: give a checkpoint directory (fault_tolerance."
                          "checkpoint_dir of the earlier run, by default <run_dir>/checkpoints) or one of its step_* "
                          "directories")
    return newest


def resolve(cfg, run_dir: Optional[Union[str, Path]] = None, restarted: bool = False
            ) -> tuple[Optional[Path], str, bool]:
    """``(checkpoint to load or None, what to log, whether it is a warning)``; ResumeError when the rules say
    there must be a checkpoint and there is none. ``restarted``: this is a worker restarted by torchrun."""
    mode, t = _mode(cfg), cfg.trainer
    if t.resume_from and mode is not ResumeMode.never:
        path = _from_path(Path(t.resume_from).expanduser())
        return path, f"resuming from {path} (trainer.resume_from)", False
    directory = checkpoint_dir(cfg, run_dir)
    newest = latest_checkpoint(directory) if directory is not None else None
    if mode is ResumeMode.never and not restarted:
        if newest is None:
            return None, "trainer.resume=never: starting fresh at step 0", False
        return None, (f"trainer.resume=never: starting fresh at step 0, ignoring the checkpoints in {directory} "
                      f"(newest {newest.name}); this run's own checkpoints go to the same directory"), True
    if newest is not None:
        return newest, f"resuming from {newest} (trainer.resume={mode.value}, the newest checkpoint)", False
    if mode is ResumeMode.must and not restarted:
        raise ResumeError(f"trainer.resume=must but there is no committed checkpoint in {directory} "
                          f"({'it does not exist' if directory is None or not directory.exists() else 'no step_* directory with .metadata'}): "
                          "set fault_tolerance.checkpoint_dir (or trainer.resume_from) to the earlier run's checkpoint "
                          "directory, or trainer.resume=auto to allow a fresh start")
    if cfg.fault_tolerance.checkpoint_dir and not directory.exists():
        return None, (f"fault_tolerance.checkpoint_dir={directory} does not exist: starting fresh at step 0 (a typo? "
                      "trainer.resume=must refuses to start fresh)"), True
    return None, f"no checkpoint in {directory}: starting fresh at step 0", False


def resume_problems(cfg) -> list[str]:
    """Config-time problems of the resume settings (the launcher's and every rank's validation)."""
    t, p = cfg.trainer, []
    if t.keep_last < 0:
        p.append(f"trainer.keep_last={t.keep_last} must be >= 0 (0 keeps every checkpoint)")
    if _mode(cfg) is ResumeMode.never and t.resume_from:
        p.append(f"trainer.resume=never contradicts trainer.resume_from={t.resume_from}: drop one of them")
        return p
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    if t.resume_from or (_mode(cfg) is ResumeMode.must and checkpoint_dir(cfg) is not None):
        try:
            resolve(cfg, restarted=restarted)
        except ResumeError as e:
            p.append(str(e))
    return p


def prune(directory: Union[str, Path], keep_last: int) -> list[Path]:
    """``trainer.keep_last``: delete all but the newest ``keep_last`` committed checkpoints, and interrupted
    (uncommitted) ``step_*`` directories older than the newest committed one. Called after a save committed."""
    import shutil

    done = committed(directory)
    if keep_last <= 0 or not done:
        return []
    keep = {p for _, p in done[-keep_last:]}
    newest = done[-1][0]
    old = [p for _, p in done if p not in keep]
    old += [p for p in Path(directory).iterdir() if (m := _STEP_DIR.match(p.name)) and int(m.group(1)) < newest
            and not (p / ".metadata").exists() and p not in keep]
    for p in old:
        (p / ".metadata").unlink(missing_ok=True)  # un-commit first: a crash mid-delete leaves no half checkpoint
        shutil.rmtree(p, ignore_errors=True)
    return old
