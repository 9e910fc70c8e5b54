"""Turn `recipe=NAME key=value ...` into a typed `ShardwiseConfig` with Hydra's compose API.

We use `hydra.compose` rather than `@hydra.main`: the compose API never changes the working
directory, never creates per-process output folders and never configures logging, so N ranks
started by torchrun compose the same config without fighting over files. The run directory is
ours (`run_dir`), created by rank 0, which also writes the resolved config there.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ShardwiseConfig, register_schemas
from .schema_check import check_override_keys, explain_validation_error
from ..errors import ConfigError


def recipes_dir() -> Path:
    """`$SHARDWISE_RECIPES_DIR`, else the `recipes/` folder of the source checkout."""
    env = os.environ.get("SHARDWISE_RECIPES_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"
    if not (path / "config.yaml").is_file():
        raise ConfigError(
            f"recipes folder not found at {path} (no config.yaml). Install shardwise from a source "
            "checkout (pip install -e .) or point SHARDWISE_RECIPES_DIR at a copy of its recipes/."
        )
    return path


def available_recipes() -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / "recipe").glob("*.yaml"))


def compose_dictconfig(overrides: Sequence[str]) -> DictConfig:
    """Compose recipes/config.yaml with the overrides; errors name the key and the fix."""
    register_schemas()
    overrides = list(overrides)
    if not any(o.split("=", 1)[0].lstrip("+~") == "recipe" for o in overrides):
        raise ConfigError(f"no recipe given: add recipe=NAME, one of {available_recipes()}")
    groups = [p.name for p in recipes_dir().iterdir() if p.is_dir()]
    problems = check_override_keys(overrides, groups)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = explain_validation_error(e) or str(e).strip()
        if "recipe" in msg and "Could not find" in msg:
            msg = f"{msg}\nfix: use recipe=NAME with NAME one of {available_recipes()}"
        raise ConfigError(f"invalid configuration: {msg}") from None
    finally:
        GlobalHydra.instance().clear()


def compose_config(overrides: Sequence[str]) -> tuple[ShardwiseConfig, str]:
    """(typed config, recipe name)."""
    dcfg = compose_dictconfig(overrides)
    recipe = next(o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "recipe")
    try:
        cfg = OmegaConf.to_object(dcfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid configuration: {explain_validation_error(e) or e}") from None
    assert isinstance(cfg, ShardwiseConfig)
    return cfg, recipe


def to_yaml(cfg: ShardwiseConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
