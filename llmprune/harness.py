"""The lm-evaluation-harness bridge: `eval.lm_eval.tasks` run in-process on the teacher, the pruned and the final
model through lm_eval's `HFLM` wrapper over the model already in memory (no reload, no second copy).

Task data must be local to run offline: `eval.lm_eval.include_path` names a folder of task YAMLs over local files.
One task needs nothing but the run itself: `llmprune_heldout`, written into the run directory from the held-out
windows (text that calibration and distillation never read). Each item is a passage's first `context_tokens`
tokens and a choice among its true next `continuation_tokens` tokens and the continuations of other held-out
passages at the same position; chance is 1 / `choices`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from llmprune.distributed import barrier, is_rank_zero
from llmprune.errors import ConfigError

log = logging.getLogger("llmprune")

HELDOUT_TASK = "llmprune_heldout"


def write_heldout_task(heldout: torch.Tensor, tokenizer, folder: Path, span: int = 64, choices: int = 4,
                       seed: int = 0) -> int:
    """Write `folder/llmprune_heldout.{yaml,jsonl}` from held-out windows (N, S); returns the number of items.

    Every window gives S // span non-overlapping passages (span at most S); each passage is 3/4 context and 1/4
    continuation. The distractors of an item are true continuations of other items, drawn with `seed`, so every
    choice is fluent text of the same length in tokens and only the context tells the true one apart.
    """
    span = min(span, heldout.shape[1])
    context_tokens = span * 3 // 4
    pieces = heldout[:, : heldout.shape[1] // span * span].reshape(-1, span)  # (items, span)
    if len(pieces) < choices:
        raise ConfigError(f"eval.lm_eval: the held-out text gives {len(pieces)} passages of {span} tokens, fewer than "
                          f"the {choices} choices of {HELDOUT_TASK}; raise data.eval_samples or data.seq_len.")
    contexts = tokenizer.batch_decode(pieces[:, :context_tokens])
    endings = tokenizer.batch_decode(pieces[:, context_tokens:])
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i, (context, ending) in enumerate(zip(contexts, endings)):
        others = [j for j in torch.randperm(len(pieces), generator=generator).tolist() if j != i][: choices - 1]
        label = int(torch.randint(choices, (), generator=generator))
        options = [endings[j] for j in others]
        options.insert(label, ending)
        rows.append({"context": context, "choices": options, "label": label})
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{HELDOUT_TASK}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    # the continuation follows the context directly (target_delimiter ""): it is the text's own next tokens
    (folder / f"{HELDOUT_TASK}.yaml").write_text("\n".join([
        f"task: {HELDOUT_TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        f"  data_files: {{test: {json.dumps(str(data.resolve()))}}}",
        "test_split: test",
        "output_type: multiple_choice",
        'doc_to_text: "{{context}}"',
        'doc_to_choice: "{{choices}}"',
        'doc_to_target: "{{label}}"',
        'target_delimiter: ""',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "metadata: {version: 1.0}", ""]), encoding="utf-8")
    return len(rows)


def task_manager(tasks: list[str], paths: list[str]):
    """lm_eval's TaskManager over `paths`; its own registry (~15 s to index) only when a task is not in `paths`."""
    from lm_eval.tasks import TaskManager

    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths or None)


def check_lm_eval(lm_eval_cfg) -> None:
    """Fail before any work when tasks are asked for but lm_eval is missing or a task is unknown."""
    if not lm_eval_cfg.tasks:
        return
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ConfigError("eval.lm_eval.tasks needs the lm-evaluation-harness: pip install 'llmprune[lm-eval]' "
                          f"(or set eval.lm_eval.tasks=[]). ({err})") from None
    include = lm_eval_cfg.include_path  # a folder: validate() checked it
    others = [t for t in lm_eval_cfg.tasks if t != HELDOUT_TASK]
    missing = [t for t in others if t not in task_manager(others, [include] if include else []).all_tasks]
    if missing:
        raise ConfigError(f"eval.lm_eval.tasks: unknown task(s) {missing}. Use {HELDOUT_TASK} (built from the "
                          "held-out text), a task of lm_eval's registry, or one defined by a YAML in "
                          "eval.lm_eval.include_path.")


def lm_eval_tasks(lm_eval_cfg, heldout: torch.Tensor, tokenizer, run_dir: Path, seed: int) -> list[Path]:
    """The run's own task folders for lm_eval: run_dir/lm_eval_tasks with llmprune_heldout when it is asked for."""
    if HELDOUT_TASK not in lm_eval_cfg.tasks:
        return []
    folder = run_dir / "lm_eval_tasks"
    if is_rank_zero():
        count = write_heldout_task(heldout, tokenizer, folder, seed=seed)
        log.info(f"lm_eval: {HELDOUT_TASK} has {count} items from the held-out text ({folder})")
    barrier()
    return [folder]


def run_lm_eval(model, tokenizer, lm_eval_cfg, include_paths: list[Path], seed: int) -> dict[str, dict]:
    """Scores of `model` on eval.lm_eval.tasks: {task: {metric: value, metric_stderr: value}}.

    Runs in this process on the model as it is (device, dtype); the model is left in eval mode only while scored.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    paths = [str(p) for p in include_paths]
    if lm_eval_cfg.include_path is not None:
        paths.append(str(lm_eval_cfg.include_path))
    was_training = model.training
    model.eval()
    try:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm_eval_cfg.batch_size,
                       max_length=lm_eval_cfg.max_length)
        results = simple_evaluate(model=wrapped, tasks=list(lm_eval_cfg.tasks),
                                  task_manager=task_manager(list(lm_eval_cfg.tasks), paths),
                                  num_fewshot=lm_eval_cfg.num_fewshot, limit=lm_eval_cfg.limit, log_samples=False,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed)
    finally:
        model.train(was_training)
    scores = {}
    for task, metrics in results["results"].items():
        # lm_eval names metrics "<metric>,<filter>": keep the metric, drop the default "none" filter
        scores[task] = {key.replace(",none", ""): value for key, value in metrics.items()
                        if "," in key and isinstance(value, (int, float))}
    return scores
