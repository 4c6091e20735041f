"""eval.lm_eval: the lm-evaluation-harness bridge. The held-out task is built from the held-out windows exactly; the
real SmolLM2 scores above chance on it through lm_eval's HFLM in this process; a run scores the teacher, the pruned
and the final model, and pruning nothing scores exactly as the teacher does."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_run_overrides
from transformers import AutoTokenizer

import llmprune
from llmprune import ConfigError
from llmprune.harness import HELDOUT_TASK, run_lm_eval, write_heldout_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def settings(**overrides) -> SimpleNamespace:
    base = dict(tasks=[HELDOUT_TASK], include_path=None, batch_size=8, max_length=None, num_fewshot=None, limit=None,
                models=["teacher", "pruned", "final"])
    return SimpleNamespace(**{**base, **overrides})


def test_heldout_task_items_are_the_heldout_text_with_other_passages_as_distractors(tiny_model_dirs, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    heldout = torch.randint(2, 128, (3, 40), generator=torch.Generator().manual_seed(0))  # 3 x 2 passages of 20
    count = write_heldout_task(heldout, tokenizer, tmp_path, span=20, choices=4, seed=0)
    rows = [json.loads(line) for line in (tmp_path / f"{HELDOUT_TASK}.jsonl").read_text().splitlines()]
    passages = heldout.reshape(-1, 20)
    assert count == len(rows) == 6
    endings = [tokenizer.decode(p[15:]) for p in passages]
    labels = set()
    for row, passage in zip(rows, passages):
        assert row["context"] == tokenizer.decode(passage[:15])
        assert row["choices"][row["label"]] == tokenizer.decode(passage[15:])
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4, row
        assert all(choice in endings for choice in row["choices"])  # distractors: other passages' continuations
        labels.add(row["label"])
    assert len(labels) > 1, "the true continuation is always at the same position"
    assert f"data_files: {{test: {json.dumps(str(tmp_path.resolve() / (HELDOUT_TASK + '.jsonl')))}}}" in \
        (tmp_path / f"{HELDOUT_TASK}.yaml").read_text()
    with pytest.raises(ConfigError, match="data.eval_samples"):
        write_heldout_task(heldout[:1], tokenizer, tmp_path, span=20, choices=4)


def test_smollm2_chooses_the_true_continuation_well_above_chance(smollm2_loaded, tmp_path):
    from llmprune import data as text

    model, tokenizer, _ = smollm2_loaded
    splits = text.split_stream(text.token_stream(text.embedded_documents(), tokenizer), 256, 8, 4, 0.1, 0)
    write_heldout_task(splits.heldout, tokenizer, tmp_path, seed=0)  # 4 windows x 4 passages of 64 tokens
    scores = run_lm_eval(model, tokenizer, settings(), [tmp_path], seed=0)[HELDOUT_TASK]
    # chance is 0.25: a guesser reaches 8 of 16 with probability ~3%; the model gets 11 of these 16 (~0.9 on 64)
    assert scores["acc"] >= 0.5, scores
    assert 0 < scores["acc_stderr"] < 0.2, scores


def test_run_scores_teacher_pruned_and_final_and_pruning_nothing_changes_no_score(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], out, "data.eval_samples=4",
                                   f"eval.lm_eval.tasks=[{HELDOUT_TASK}]", "prune.export_config.hidden_size=40",
                                   "prune.export_config.ffn_hidden_size=48")
    report = llmprune.run("smollm2_minitron", overrides)
    scored = report["lm_eval"]
    assert set(scored) == {"teacher", "pruned", "final"}
    assert all(0 <= scored[m][HELDOUT_TASK]["acc"] <= 1 for m in scored)
    assert "lm_eval llmprune_heldout acc" in (out / "report.md").read_text()
    assert "lm_eval llmprune_heldout acc" in (out / "final" / "README.md").read_text()
    assert (out / "lm_eval_tasks" / f"{HELDOUT_TASK}.yaml").is_file()

    same = tmp_path / "same"
    report = llmprune.run("smollm2_minitron", tiny_run_overrides(
        tiny_model_dirs["llama"], same, "data.eval_samples=4", f"eval.lm_eval.tasks=[{HELDOUT_TASK}]",
        "eval.lm_eval.models=[teacher,pruned]", "prune.export_config.hidden_size=null",
        "prune.export_config.ffn_hidden_size=null", "distill.max_steps=0"))
    assert report["lm_eval"]["pruned"] == report["lm_eval"]["teacher"], report["lm_eval"]


def test_unknown_task_and_bad_settings_fail_before_any_work(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="no_such_task"):
        llmprune.run("smollm2_minitron", tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "a",
                                                            "eval.lm_eval.tasks=[no_such_task]",
                                                            f"eval.lm_eval.include_path={tmp_path}",
                                                            "prune.export_config.hidden_size=40",
                                                            "prune.export_config.ffn_hidden_size=48"))
    assert not (tmp_path / "a" / "importance.safetensors").exists()
    with pytest.raises(ConfigError) as err:
        llmprune.load_config("smollm2_minitron", ["eval.lm_eval.models=[student]", "eval.lm_eval.limit=0",
                                                  "eval.lm_eval.include_path=/no/such/folder"])
    for key in ("eval.lm_eval.models", "eval.lm_eval.limit", "eval.lm_eval.include_path"):
        assert key in str(err.value)
