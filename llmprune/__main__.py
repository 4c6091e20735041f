"""python -m llmprune recipe=<name> [key=value ...] | --help | --list-recipes | --cfg

Runs under torchrun too: `torchrun --nproc_per_node=N -m llmprune recipe=...`.
"""

from __future__ import annotations

import os
import sys

from llmprune.config import DEFAULT_RECIPE, ConfigError, describe_schema, list_recipes, load_config


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip(), "\n\nRecipes:", ", ".join(list_recipes()), "\n\nKeys:\n")
        print(describe_schema())
        return 0
    if "--list-recipes" in argv:
        print("\n".join(list_recipes()))
        return 0
    print_only = "--cfg" in argv
    recipe = DEFAULT_RECIPE
    overrides = []
    for arg in argv:
        if arg.startswith("recipe="):
            recipe = arg.split("=", 1)[1]
        elif arg != "--cfg":
            overrides.append(arg)
    try:
        cfg = load_config(recipe, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # Hydra composition errors (unknown key, bad type) name the key already
        print(f"error: {type(err).__name__}: {err}\nSee `python -m llmprune --help` for the keys.", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    if print_only:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return 0
    _init_distributed()
    from llmprune.distributed import is_rank_zero
    from llmprune.pipeline import run
    from llmprune.report import console_table

    if is_rank_zero():
        print(run_header(cfg, overrides), file=sys.stderr)
    try:
        report = run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if is_rank_zero():
        print(console_table(report))
    return 0


def run_header(cfg, overrides: list[str]) -> str:
    """What the run is, in a few lines (the whole resolved config goes to <output_dir>/config.yaml)."""
    from omegaconf import OmegaConf

    p = cfg.prune
    what = {"minitron": "targets", "gradnas": "constraints"}[p.mode]
    shape = {k: v for k, v in OmegaConf.to_container(p.export_config if what == "targets" else p.constraints).items()
             if v is not None}
    if p.mode == "minitron" and any(v is not None for v in p.constraints.values()):
        what, shape = "search within", {k: v for k, v in p.constraints.items() if v is not None}
    return "\n".join([f"llmprune: recipe {cfg.recipe}, model {cfg.model.path}, prune.mode={p.mode} ({what} {shape})",
                      f"  output_dir={cfg.output_dir} (full config: {cfg.output_dir}/config.yaml; --cfg prints it)",
                      f"  overrides: {' '.join(overrides) or '(none)'}"])


if __name__ == "__main__":
    from llmprune.allocator import use_jemalloc

    use_jemalloc()  # runs this command again with jemalloc preloaded where it is installed (LLMPRUNE_ALLOCATOR)
    sys.exit(main())
