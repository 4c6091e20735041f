"""Bad input: every user mistake fails early with a message that names the key, what is allowed and the fix.

Through `load_config` (compose + validate), `llmprune.run` (the model-dependent checks) and `python -m llmprune`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
from conftest import tiny_run_overrides

import llmprune
from llmprune import ConfigError, PlanError, load_config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "llmprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


# -- compose time (no model is loaded) ------------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["prune.export_config.hiden_size=3", "+prune.export_config.hiden_size=3"])
def test_typo_in_key_fails_at_compose_and_suggests_the_key(override):
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", [override])
    message = str(err.value)
    assert "prune.export_config.hiden_size" in message
    assert "did you mean prune.export_config.hidden_size" in message, message
    assert "num_query_groups" in message  # lists the group's keys


def test_typo_in_group_and_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", ["prune.depht.method=kl", "+evaluation.enabled=false"])
    message = str(err.value)
    assert "'prune.depht'" in message and "did you mean prune.depth" in message, message
    assert "'evaluation'" in message and "Keys of the top level" in message, message


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", ["data.seq_len=long"])
    assert "data.seq_len" in str(err.value) and "Integer" in str(err.value), str(err.value)


def test_unknown_recipe_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("qwen4_minitron")
    message = str(err.value)
    assert "Unknown recipe 'qwen4_minitron'" in message
    for name in llmprune.list_recipes():
        assert name in message
    with pytest.raises(ConfigError, match="Known: bert_gradnas, gptj_gradnas, llama31_minitron_4b_depth"):
        llmprune.run("qwen4_minitron")


def test_recipe_from_a_yaml_path(tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("defaults:\n  - base\n  - _self_\nprune:\n  export_config:\n    hidden_size: 64\n")
    cfg = load_config(str(recipe))
    assert (cfg.recipe, cfg.output_dir, cfg.prune.export_config.hidden_size) == ("mine", "outputs/mine", 64)
    recipe.write_text("defaults:\n  - base\n  - _self_\nprune:\n  exprt_config:\n    hidden_size: 64\n")
    with pytest.raises(ConfigError, match="Key 'exprt_config' not in 'PruneConfig'"):
        load_config(str(recipe))


def test_bad_choices_are_listed_all_at_once():
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", ["prune.depth.method=foo", "model.dtype=int8", "prune.importance=l1"])
    message = str(err.value)
    assert "prune.depth.method='foo' is not one of: drop_one, block_importance, contiguous" in message
    assert "model.dtype='int8' is not one of: float32, bfloat16, float16, auto" in message
    assert "prune.importance='l1' is not one of: activation, magnitude, taylor, random" in message


def test_baseline_importance_with_block_importance_fails_before_any_work():
    with pytest.raises(ConfigError, match="prune.depth.method=block_importance reads the activation pass"):
        load_config("smollm2_minitron_depth", ["prune.importance=magnitude", "prune.depth.method=block_importance"])
    load_config("smollm2_minitron_depth", ["prune.importance=magnitude", "prune.depth.method=drop_one"])


def test_nonpositive_values_are_rejected():
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", ["data.seq_len=0", "prune.export_config.hidden_size=0", "data.eval_fraction=1"])
    message = str(err.value)
    for key in ("data.seq_len=0", "prune.export_config.hidden_size=0", "data.eval_fraction=1"):
        assert key in message, message


def test_files_source_needs_existing_paths(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ConfigError, match=f"data.paths: '{missing}' does not exist"):
        load_config("smollm2_minitron", ["data.source=files", f"data.paths=[{missing}]"])
    with pytest.raises(ConfigError, match=r"data.source=files needs data.paths"):
        load_config("smollm2_minitron", ["data.source=files"])


def test_distill_steps_are_accepted_and_bad_distill_values_are_listed_at_once():
    assert load_config("smollm2_minitron", ["distill.max_steps=0"]).distill.max_steps == 0
    assert load_config("smollm2_minitron", ["distill.max_steps=100"]).distill.max_steps == 100
    with pytest.raises(ConfigError) as err:
        load_config("smollm2_minitron", ["distill.max_steps=100", "distill.global_batch_size=6",
                                         "distill.micro_batch_size=4", "distill.topk_weight=0.5",
                                         "distill.precision=fp16", "export.push_to_hub=true"])
    message = str(err.value)
    for needle in ("distill.global_batch_size=6 must be a multiple of distill.micro_batch_size=4",
                   "distill.topk_weight=0.5 needs distill.topk=<k>",
                   "distill.precision='fp16' is not one of: auto, bf16, fp32",
                   "export.push_to_hub=true needs export.repo_id=<user or org>/<name>"):
        assert needle in message, message
    with pytest.raises(ConfigError, match="every loss weight is 0; set one of distill.kl_weight"):
        load_config("smollm2_minitron", ["distill.max_steps=100", "distill.kl_weight=0"])
    assert load_config("smollm2_minitron", ["distill.max_steps=0", "distill.kl_weight=0"]).distill.kl_weight == 0
    with pytest.raises(ConfigError, match=r"distill.micro_batch_size=0 must be at least 1"):
        load_config("smollm2_minitron", ["distill.micro_batch_size=0"])


# -- model-dependent checks (a tiny model is loaded; they fail before calibrating) ---------------------------------
def run_tiny(model_dir, out, *extra: str) -> dict:
    return llmprune.run("smollm2_minitron", tiny_run_overrides(model_dir, out, "prune.export_config.hidden_size=null",
                                                               "prune.export_config.ffn_hidden_size=null", *extra))


def test_target_bigger_than_model_names_key_and_max(tiny_model_dirs, tmp_path):
    with pytest.raises(PlanError) as err:
        run_tiny(tiny_model_dirs["llama"], tmp_path, "prune.export_config.hidden_size=96",
                 "prune.export_config.num_layers=9")
    message = str(err.value)
    assert "prune.export_config.hidden_size=96 is larger than the model's 48; choose at most 48" in message
    assert "prune.export_config.num_layers=9 is larger than the model's 4; choose at most 4" in message
    assert not (tmp_path / "importance.safetensors").exists(), "targets must be checked before calibrating"


def test_heads_not_multiple_of_groups(tiny_model_dirs, tmp_path):
    with pytest.raises(PlanError, match="num_attention_heads=5 is not a multiple of num_query_groups=2"):
        run_tiny(tiny_model_dirs["llama"], tmp_path, "prune.export_config.num_attention_heads=5")
    with pytest.raises(PlanError, match="needs 6 heads per group but the model has 3"):
        run_tiny(tiny_model_dirs["llama"], tmp_path, "prune.export_config.num_query_groups=1",
                 "prune.export_config.num_attention_heads=6")


def test_unsupported_family_lists_supported_ones(tiny_model_dirs, tmp_path):
    model_dir = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0,
                                     eos_token_id=1)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    transformers.AutoTokenizer.from_pretrained(tiny_model_dirs["llama"]).save_pretrained(model_dir)
    with pytest.raises(ConfigError) as err:
        run_tiny(model_dir, tmp_path / "run")
    assert "Unsupported model family 'gpt2'. Supported: llama, mistral, qwen2, qwen3" in str(err.value)


def test_missing_model_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_tiny(tmp_path / "no_such_model", tmp_path / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json and no .gguf file"):
        run_tiny(tmp_path / "empty", tmp_path / "run")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError, match="is a file but not a .gguf"):
        run_tiny(tmp_path / "notes.txt", tmp_path / "run")
    with pytest.raises(ConfigError, match="unknown embedded model. Known: embedded:smollm2"):
        run_tiny("embedded:gpt5", tmp_path / "run")


def test_target_no_stock_config_can_express(tmp_path):
    """attention_bias=True rules out the Mistral fallback, so hidden % heads != 0 cannot be exported."""
    from conftest import save_tiny

    model_dir = save_tiny("llama", tmp_path / "biased", attention_bias=True)
    with pytest.raises(ConfigError) as err:
        run_tiny(model_dir, tmp_path / "run", "prune.export_config.hidden_size=40")
    message = str(err.value)
    assert "LlamaConfig rejects the pruned shape" in message and "not a multiple" in message, message
    assert "make prune.export_config.hidden_size a multiple of num_attention_heads" in message, message
    assert not (tmp_path / "run" / "pruned").exists()


def test_keep_architecture_refuses_the_fallback(tiny_model_dirs, tmp_path):
    with pytest.raises(ConfigError, match="Set export.architecture=auto"):
        run_tiny(tiny_model_dirs["llama"], tmp_path, "prune.export_config.hidden_size=40", "export.architecture=keep")


# -- python -m llmprune ---------------------------------------------------------------------------------------------
def test_cli_typo_exits_2_with_the_key_and_no_traceback(tmp_path):
    result = cli("recipe=smollm2_minitron", "prune.export_config.hiden_size=3", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "prune.export_config.hiden_size" in result.stderr and "hidden_size" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_cli_bad_target_exits_2_and_unknown_recipe_lists_recipes(tiny_model_dirs, tmp_path):
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "run")
    result = cli("recipe=smollm2_minitron", *overrides, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "prune.export_config.hidden_size=448 is larger than the model's 48" in result.stderr
    assert "Traceback" not in result.stderr
    result = cli("recipe=nope", cwd=tmp_path)
    assert result.returncode == 2 and "Known: " + ", ".join(llmprune.list_recipes()) in result.stderr, result.stderr


def test_cli_help_list_and_cfg(tmp_path):
    help_text = cli("--help", cwd=tmp_path)
    assert help_text.returncode == 0
    assert "[prune.export_config] hidden_size=None" in help_text.stdout and "smollm2_minitron" in help_text.stdout
    listed = cli("--list-recipes", cwd=tmp_path)
    assert listed.stdout.split() == llmprune.list_recipes()
    shown = cli("recipe=qwen3_minitron", "prune.export_config.num_layers=30", "--cfg", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "num_layers: 30" in shown.stdout and "recipe: qwen3_minitron" in shown.stdout
    assert "output_dir: outputs/qwen3_minitron" in shown.stdout


def test_run_header_is_short_and_names_recipe_model_targets_and_overrides():
    from llmprune.__main__ import run_header

    header = run_header(load_config("smollm2_minitron", ["distill.max_steps=3"]), ["distill.max_steps=3"])
    assert len(header.splitlines()) == 3
    for needle in ("recipe smollm2_minitron", "model embedded:smollm2", "'hidden_size': 448",
                   "outputs/smollm2_minitron/config.yaml", "overrides: distill.max_steps=3"):
        assert needle in header, header
    assert "search within {'params': '84.0M'}" in run_header(load_config("smollm2_minitron_search"), [])
