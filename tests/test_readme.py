"""README.md's commands run as written. Every ```bash block: the recipes, config keys (composed with Hydra, no
torch) and repository paths it names exist. Blocks marked `<!-- readme-test: run -->` (the CPU ones) also
run, from a scratch directory that links the repository's docs/, scripts/, shardwise/ and recipes/:
shardwise-validate and the preprocessing in the default suite, every training (2 steps, small batches: the
overrides are appended, and Hydra's last value wins), export and generation under `-m slow`. Not run:
`pip install` and `pytest` lines (this is the suite they install and start)."""
import glob
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- readme-test: run -->"
ENTRY = {"shardwise-launch": "shardwise.launch", "shardwise-validate": "shardwise.recipe_check",
         "shardwise-export": "shardwise.export", "shardwise-generate": "shardwise.generate"}
CHEAP = ("shardwise-validate", "scripts/preprocess_data.py")
TINY = ["trainer.max_steps=2", "trainer.eval_every=0", "data.seq_len=32", "data.global_batch_size=4",
        "data.micro_batch_size=2", "logging.progress_bar=false"]
PLACEHOLDER = "/path/to/"  # template lines (a user's own model directory): checked for nothing


def _commands(body: list[str]) -> list[list[str]]:
    """Shell words of each command of a block: continuation lines joined, comments dropped, split on &&."""
    lines, cur = [], ""
    for ln in body:
        if ln.rstrip().endswith("\\"):
            cur += ln.rstrip()[:-1] + " "
            continue
        lines.append(cur + ln)
        cur = ""
    out = []
    for ln in lines:
        words: list[str] = []
        for w in shlex.split(ln, comments=True):
            if w == "&&":
                out.append(words)
                words = []
            else:
                words.append(w)
        if words:
            out.append(words)
    return out


def readme_blocks() -> list[tuple[bool, list[list[str]]]]:
    """(marked to run, commands) of every ```bash block of README.md."""
    lines, out, i = (ROOT / "README.md").read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = lines.index("```", i + 1)
            out.append((i > 0 and lines[i - 1].strip() == MARK, _commands(lines[i + 1:j])))
            i = j
        i += 1
    return out


def _strip_env(cmd: list[str]) -> list[str]:
    """The command without leading VAR=value assignments and sudo."""
    i = 0
    while i < len(cmd) and (cmd[i] == "sudo" or (cmd[i].split("=", 1)[0].isupper() and "=" in cmd[i])):
        i += 1
    return cmd[i:]


def _overrides(cmd: list[str]) -> list[str]:
    """key=value words of a shardwise-launch / shardwise-validate command (flags and their values skipped)."""
    out, skip = [], False
    for w in cmd[1:]:
        if skip:
            skip = False
        elif w.startswith("-"):
            skip = "=" not in w and w not in ("--standalone",)
        elif "=" in w:
            out.append(w)
    return out


def _all_commands():
    return [(marked, _strip_env(c)) for marked, cmds in readme_blocks() for c in cmds]


def test_readme_has_marked_blocks():
    assert sum(marked for marked, _ in readme_blocks()) >= 5  # a test that finds nothing checks nothing


def test_every_recipe_key_and_path_named_exists():
    from shardwise.trainer.compose import compose_dictconfig
    checked = 0
    for _, cmd in _all_commands():
        line = " ".join(cmd)
        if not cmd or PLACEHOLDER in line:
            continue
        for w in cmd:
            for part in w.split("="):  # also the value of key=path words
                if part.startswith(("scripts/", "recipes/", "docs/", "shardwise/", "tests/")):
                    assert glob.glob(str(ROOT / part)), f"README names {part!r}, which does not exist ({line})"
        if cmd[0] in ("shardwise-launch", "shardwise-validate") or (cmd[0].endswith("launch.sh")):
            compose_dictconfig(_overrides(cmd))  # ConfigError names an unknown key, a bad value or recipe
            checked += 1
    assert checked >= 8


def _run(cmd: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    env.pop("WORLD_SIZE", None)
    if cmd[0] in ENTRY:
        argv = [sys.executable, "-m", ENTRY[cmd[0]], *cmd[1:]]
        if cmd[0] == "shardwise-launch":
            argv += [*TINY, f"data.cache_dir={cache}"]
            if any(w.startswith("fault_tolerance.checkpoint_every=") for w in cmd):
                argv.append("fault_tolerance.checkpoint_every=2")  # a checkpoint within the 2 steps
    elif cmd[0] == "python":
        argv = [sys.executable, *cmd[1:]]
    else:
        raise AssertionError(f"README run block has a command this test cannot run: {cmd}")
    p = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _scratch(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for name in ("docs", "scripts", "shardwise", "recipes"):
        (work / name).symlink_to(ROOT / name)
    return work


def _runnable(cheap_only: bool):
    for marked, cmd in _all_commands():
        if not marked or not cmd or cmd[0] in ("pip", "pytest"):
            continue
        is_cheap = cmd[0] == "shardwise-validate" or (cmd[0] == "python" and cmd[1:2] == ["scripts/preprocess_data.py"])
        if is_cheap or not cheap_only:
            yield cmd


def test_cheap_readme_commands_run_as_written(tmp_path):
    work = _scratch(tmp_path)
    cmds = list(_runnable(cheap_only=True))
    assert len(cmds) >= 3
    for cmd in cmds:
        _run(cmd, work, tmp_path / "cache")
    assert (work / "data/docs.bin").stat().st_size > 0 and (work / "data/code.idx").is_file()


@pytest.mark.slow
def test_every_marked_readme_command_runs_as_written(tmp_path):
    work = _scratch(tmp_path)
    outputs = {}
    for cmd in _runnable(cheap_only=False):
        outputs[" ".join(cmd)] = _run(cmd, work, tmp_path / "cache").stdout
    assert (work / "runs/demo/hf/config.json").is_file()
    assert any(k.startswith("shardwise-generate runs/demo ") and v.startswith("def ") for k, v in outputs.items())
    assert (work / "runs/demo_continued/metrics.jsonl").is_file()
