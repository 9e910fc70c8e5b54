"""trainer.resume / trainer.resume_from / trainer.keep_last decisions (shardwise.fault_tolerance.resume) on fake
checkpoint directories (a committed checkpoint is a step_* directory with .metadata), and their config checks."""
import pytest

from shardwise.fault_tolerance.resume import ResumeError, ResumeMode, checkpoint_dir, prune, resolve, step_dir
from shardwise.trainer.compose import compose_config
from shardwise.trainer.config_checks import ConfigError, validate_config


def _cfg(*overrides):
    return compose_config(["recipe=tiny_dense", *overrides])[0]


def _ckpt(directory, step, commit=True):
    d = step_dir(directory, step)
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x")
    if commit:
        (d / ".metadata").write_bytes(b"m")
    return d


def test_default_directory_and_auto(tmp_path):
    cfg = _cfg(f"run_dir={tmp_path / 'run'}")
    assert cfg.trainer.resume is ResumeMode.auto and cfg.trainer.save_final and cfg.trainer.keep_last == 0
    assert checkpoint_dir(cfg) == tmp_path / "run" / "checkpoints"
    path, what, warn = resolve(cfg)
    assert path is None and not warn and "starting fresh" in what
    _ckpt(tmp_path / "run/checkpoints", 3)
    newest = _ckpt(tmp_path / "run/checkpoints", 10)
    _ckpt(tmp_path / "run/checkpoints", 12, commit=False)  # an interrupted save is never resumed from
    assert resolve(cfg)[0] == newest


def test_auto_warns_on_a_missing_checkpoint_dir(tmp_path):
    path, what, warn = resolve(_cfg(f"fault_tolerance.checkpoint_dir={tmp_path / 'typo'}"))
    assert path is None and warn and f"checkpoint_dir={tmp_path / 'typo'} does not exist" in what


def test_never_ignores_checkpoints_but_a_restarted_worker_resumes(tmp_path):
    newest = _ckpt(tmp_path, 5)
    cfg = _cfg(f"fault_tolerance.checkpoint_dir={tmp_path}", "trainer.resume=never")
    path, what, warn = resolve(cfg)
    assert path is None and warn and "ignoring the checkpoints" in what and newest.name in what
    assert resolve(cfg, restarted=True)[0] == newest  # torchrun --max-restarts: the job's own progress


def test_must_fails_with_the_path(tmp_path):
    cfg = _cfg(f"fault_tolerance.checkpoint_dir={tmp_path / 'none'}", "trainer.resume=must")
    with pytest.raises(ResumeError, match=str(tmp_path / "none")):
        resolve(cfg)
    with pytest.raises(ConfigError, match="trainer.resume=must but there is no committed checkpoint"):
        validate_config(cfg, 2)  # what the launcher runs before torchrun
    _ckpt(tmp_path / "none", 1)
    validate_config(cfg, 2)


def test_resume_from_a_step_or_a_directory(tmp_path):
    a = _ckpt(tmp_path / "old", 4)
    b = _ckpt(tmp_path / "old", 8)
    assert resolve(_cfg(f"trainer.resume_from={a}"))[0] == a
    assert resolve(_cfg(f"trainer.resume_from={tmp_path / 'old'}"))[0] == b
    half = _ckpt(tmp_path / "old", 9, commit=False)
    with pytest.raises(ResumeError, match="no .metadata"):
        resolve(_cfg(f"trainer.resume_from={half}"))
    for bad in (tmp_path / "nothing", tmp_path):  # missing; a directory without step_* checkpoints
        with pytest.raises(ConfigError, match=f"trainer.resume_from={bad} "):
            validate_config(_cfg(f"trainer.resume_from={bad}"), 2)
    with pytest.raises(ConfigError, match="contradicts"):
        validate_config(_cfg(f"trainer.resume_from={a}", "trainer.resume=never"), 2)


def test_config_refuses_bad_values():
    with pytest.raises(ConfigError, match="trainer.resume"):
        _cfg("trainer.resume=sometimes")  # an Enum: Hydra refuses it at compose time
    with pytest.raises(ConfigError, match="trainer.keep_last=-1"):
        validate_config(_cfg("trainer.keep_last=-1"), 2)
    # What the user asks for explicitly on a layout durable checkpoints do not cover is refused ...
    with pytest.raises(ConfigError, match="parallel.pp=2 with fault_tolerance"):
        validate_config(_cfg("parallel.pp=2", "fault_tolerance.checkpoint_every=5"), 4)
    validate_config(_cfg("parallel.pp=2"), 4)  # ... the defaults (final save, auto resume) are not


def test_keep_last_prunes_old_and_interrupted(tmp_path):
    for s in (1, 2, 3):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 0, commit=False)
    assert prune(tmp_path, 0) == []  # 0 = keep all
    removed = prune(tmp_path, 2)
    assert sorted(p.name for p in removed) == [step_dir(tmp_path, 0).name, step_dir(tmp_path, 1).name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [step_dir(tmp_path, s).name for s in (2, 3)]
    _ckpt(tmp_path, 4, commit=False)  # a newer interrupted save (in flight, or the next to be re-done) stays
    assert prune(tmp_path, 1) == [step_dir(tmp_path, 2)] and step_dir(tmp_path, 4).exists()
