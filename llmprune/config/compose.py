"""Recipe lookup and composition: a recipe plus Hydra overrides -> a typed, validated config."""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from llmprune.config.schema import DEFAULT_RECIPE, LLMPruneConfig
from llmprune.config.validate import validate
from llmprune.errors import ConfigError


def _package_dir(package: str, fallback: str) -> Path:
    """Directory of `llmprune.conf` / `llmprune.recipes`, installed or in a source checkout."""
    try:
        path = Path(str(resources.files(package)))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[2] / fallback


def conf_dir() -> Path:
    return _package_dir("llmprune.conf", "conf")


def recipes_dir() -> Path:
    return _package_dir("llmprune.recipes", "recipes")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def load_config(recipe: str = DEFAULT_RECIPE, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose a recipe with Hydra overrides into a typed config and validate it.

    Args:
        recipe: a recipe name (see `list_recipes()`) or a path to a recipe YAML file.
        overrides: Hydra overrides such as `prune.export_config.hidden_size=448`.

    Raises:
        ConfigError: unknown recipe, or invalid values (all problems in one message).
    """
    recipe_path = Path(recipe)
    if recipe_path.suffix in (".yaml", ".yml") and recipe_path.is_file():
        config_dir, name = recipe_path.resolve().parent, recipe_path.stem
    else:
        if recipe not in list_recipes():
            raise ConfigError(f"Unknown recipe '{recipe}'. Known: {', '.join(list_recipes())} (or a path to a .yaml).")
        config_dir, name = recipes_dir(), recipe
    GlobalHydra.instance().clear()
    schema = OmegaConf.structured(LLMPruneConfig)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            cfg = compose(config_name=name, overrides=[*overrides, f"hydra.searchpath=[file://{conf_dir()}]"])
    except HydraException as err:  # name the key and the known ones instead of Hydra's "use +key" advice
        problems = [p for o in overrides for p in _unknown_keys(_override_as_dict(o), schema)]
        cause = f" ({err.__cause__})" if err.__cause__ is not None else ""
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems or [f"{err}{cause}"])) from err
    problems = _unknown_keys(cfg, schema)  # `+key=value` adds keys past the schema's struct check
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))
    cfg = OmegaConf.merge(schema, cfg)
    cfg.recipe = name
    validate(cfg)
    return cfg


def _override_as_dict(override: str) -> dict:
    """`+a.b.c=1` -> {'a': {'b': {'c': None}}} (only the key path matters); hydra.* and ~deletions -> {}."""
    key = override.split("=", 1)[0].lstrip("+~")
    if not key or key.startswith("hydra.") or override.startswith("~"):
        return {}
    node: dict = {}
    for part in reversed(key.split(".")):
        node = {part: node or None}
    return node


def _unknown_keys(cfg, schema: DictConfig, prefix: str = "") -> list[str]:
    """Keys of `cfg` (a DictConfig or dict) that the schema lacks, each with the keys it could have meant."""
    problems = []
    for key in cfg.keys():
        if key not in schema:
            known = [str(k) for k in schema.keys()]
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            problems.append(f"unknown key '{prefix}{key}': {hint}Keys of {prefix.rstrip('.') or 'the top level'}: "
                            f"{', '.join(known)} (see python -m llmprune --help).")
        elif OmegaConf.is_dict(schema[key]) and (OmegaConf.is_dict(cfg[key]) or isinstance(cfg[key], dict)):
            problems += _unknown_keys(cfg[key], schema[key], f"{prefix}{key}.")
    return problems
