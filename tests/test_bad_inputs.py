"""Damaged or unreadable inputs, through the CLI's entry (`python -m llmprune` = llmprune.__main__.main): each stops
with a message that names the file (and line) or the key and says what to do, exit code 2, no traceback, and
nothing that looks like a finished run (no report, no pruned/ or final/ written by this run).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import tiny_run_overrides
from safetensors.torch import load_file

from llmprune.__main__ import main
from llmprune.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from llmprune.errors import InputFileError
from llmprune.files import check_gguf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = "smollm2_minitron"
SMALL = ("prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48")
FINISHED = ("report.json", "report.md", "pruned", "final")


def cli(capsys, model_dir, out, *extra: str) -> tuple[int, str]:
    """(exit code, stderr) of `python -m llmprune recipe=smollm2_minitron` on a tiny model."""
    for handler in logging.getLogger("llmprune").handlers:  # bound to the sys.stderr of the test that set it up
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr  # (setStream would flush the closed one)
    capsys.readouterr()
    code = main([f"recipe={RECIPE}", *tiny_run_overrides(model_dir, out, *SMALL, *extra)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, err


def assert_failed(code: int, err: str, *needles: str) -> None:
    assert code == 2, f"exit code {code}:\n{err[-3000:]}"
    message = err[err.index("error: ") :] if "error: " in err else err
    for needle in needles:
        assert needle in message, f"{needle!r} not in:\n{message}"


def assert_nothing_finished(out) -> None:
    left = [name for name in FINISHED if (out / name).exists()]
    assert left == [], f"a failed run left {left} in {out}"


def truncate(path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


# -- data files -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("line", "says"),
    [('{"text": "unterminated', "line 3 is not a JSON object"), ('["a", "list"]', "line 3 is a JSON list")],
)
def test_malformed_jsonl_line_names_file_and_line(capsys, tiny_model_dirs, tmp_path, line, says):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(f'{{"text": "one"}}\n\n{line}\n{{"text": "four"}}\n', encoding="utf-8")  # line 2 is blank
    out = tmp_path / "run"
    code, err = cli(capsys, tiny_model_dirs["llama"], out, "data.source=files", f"data.paths=[{corpus}]")
    assert_failed(code, err, f"{corpus}:3: {says}", "fix or delete the line")
    assert_nothing_finished(out)


def test_non_utf8_text_names_file_line_and_conversion(capsys, tiny_model_dirs, tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("first line\nsecond line: café\n".encode("latin-1"))
    out = tmp_path / "run"
    code, err = cli(capsys, tiny_model_dirs["llama"], out, "data.source=files", f"data.paths=[{corpus}]")
    assert_failed(code, err, f"{corpus}: line 2 is not UTF-8 text", "b'\\xe9'", "iconv -f latin1 -t utf-8")
    assert_nothing_finished(out)


def test_hf_dataset_unreachable_offline_says_what_to_use_instead(capsys, monkeypatch, tiny_model_dirs, tmp_path):
    import datasets
    import huggingface_hub

    for module in (datasets.config, huggingface_hub.constants):  # both read the environment at import
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code, err = cli(capsys, tiny_model_dirs["llama"], out, "data.source=hf", "data.dataset=nobody/no_such_corpus")
    assert_failed(
        code,
        err,
        "data.dataset='nobody/no_such_corpus' (data.source=hf) could not be loaded",
        "data.source=files data.paths=[...] or data.source=embedded",
    )
    assert_nothing_finished(out)


# -- model files ----------------------------------------------------------------------------------------------------
def test_truncated_model_safetensors_names_the_file(capsys, tiny_model_dirs, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    truncate(model_dir / "model.safetensors")
    out = tmp_path / "run"
    code, err = cli(capsys, model_dir, out)
    assert_failed(
        code, err, f"{model_dir / 'model.safetensors'} is truncated or corrupt", "download or export the model again"
    )
    assert_nothing_finished(out)

    (model_dir / "model.safetensors").write_bytes(b"\x00" * 64)  # overwritten, not truncated
    assert_failed(*cli(capsys, model_dir, out), f"{model_dir / 'model.safetensors'} is truncated or corrupt")


@pytest.mark.parametrize("extra", [(), ("export.formats=[hf,gguf]",)])  # read when the run starts / at validation
def test_corrupt_config_json_names_the_file(capsys, tiny_model_dirs, tmp_path, extra):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], model_dir)
    truncate(model_dir / "config.json")
    out = tmp_path / "run"
    code, err = cli(capsys, model_dir, out, *extra)
    assert_failed(
        code, err, f"{model_dir / 'config.json'} is missing or not valid JSON", "download or export the model again"
    )
    assert "Hub" not in err  # not the message for a model that could not be downloaded
    assert_nothing_finished(out)


def test_truncated_gguf_names_the_file(capsys, tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((64, 48), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(48, dtype=np.float32))
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        write()
    writer.close()
    check_gguf(path, "")  # whole, it passes: the check below fails on the truncation alone
    truncate(path, 0.9)
    out = tmp_path / "run"
    code, err = cli(capsys, path, out)
    assert_failed(code, err, f"{path} is truncated: its 2 tensors need", "download or export the model again")
    assert_nothing_finished(out)


# -- the run directory ----------------------------------------------------------------------------------------------
def test_output_dir_that_is_a_file_or_cannot_be_created(capsys, tiny_model_dirs, tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("keep me")
    code, err = cli(capsys, tiny_model_dirs["llama"], blocker)
    assert_failed(code, err, f"output_dir={blocker} is a file, not a directory", "set output_dir=<a writable")
    code, err = cli(capsys, tiny_model_dirs["llama"], blocker / "run")
    assert_failed(code, err, f"output_dir={blocker / 'run'} cannot be created or written: Not a directory")
    assert blocker.read_text() == "keep me"


def test_corrupt_importance_file_is_named_and_computed_again(capsys, tiny_model_dirs, tmp_path, llmprune_log):
    """importance.safetensors caches what calibration computes from the run's inputs: a damaged copy is reported
    by name and replaced by the same scores, which is what deleting it by hand would give."""
    out = tmp_path / "run"
    assert cli(capsys, tiny_model_dirs["llama"], out, "distill.max_steps=0")[0] == 0
    path = out / "importance.safetensors"
    scores = {k: v.clone() for k, v in load_file(str(path)).items()}  # not views of the file truncated below
    plan = (out / "plan.json").read_text()
    truncate(path)
    llmprune_log.clear()
    assert cli(capsys, tiny_model_dirs["llama"], out, "distill.max_steps=0")[0] == 0
    warned = [line for line in llmprune_log if str(path) in line]
    assert warned and "is truncated or corrupt" in warned[0] and "computing the scores again" in warned[0], warned
    again = load_file(str(path))
    assert again.keys() == scores.keys() and all(torch.equal(again[k], scores[k]) for k in scores)
    assert (out / "plan.json").read_text() == plan


# -- distillation checkpoints ---------------------------------------------------------------------------------------
def test_corrupt_distill_checkpoint_names_the_file_and_the_fix_works(capsys, tiny_model_dirs, tmp_path, llmprune_log):
    """A run killed after its last checkpoint (final/ and the report not yet written) whose newest checkpoint is
    then damaged: resuming stops and names the file; doing what the message says resumes from the one before and
    ends at the uninterrupted run's weights."""
    out = tmp_path / "run"
    steps = ("distill.max_steps=3", "distill.save_every=1", "distill.keep_checkpoints=2")
    assert cli(capsys, tiny_model_dirs["llama"], out, *steps)[0] == 0
    expected = {k: v.clone() for k, v in load_file(str(out / "final" / "model.safetensors")).items()}
    for name in FINISHED[:2] + ("final",):
        (out / name).unlink() if (out / name).is_file() else shutil.rmtree(out / name)
    ckpt = out / "distill_ckpt"
    assert (ckpt / "latest").read_text() == "step_000003"
    truncate(ckpt / "step_000003" / "model.safetensors")

    code, err = cli(capsys, tiny_model_dirs["llama"], out, *steps)
    assert_failed(
        code,
        err,
        f"{ckpt / 'step_000003' / 'model.safetensors'} is truncated or corrupt",
        f"delete {ckpt / 'step_000003'} to resume from step_000002, or delete {ckpt} to start",
    )
    assert not (out / "final").exists() and not (out / "report.json").exists()

    shutil.rmtree(ckpt / "step_000003")  # the fix the message gives; `latest` still names the deleted step
    code, err = cli(capsys, tiny_model_dirs["llama"], out, *steps)
    assert code == 0, err[-3000:]
    assert f"distill: resuming from {ckpt / 'step_000002'} (step 2 of 3)" in llmprune_log, llmprune_log
    got = load_file(str(out / "final" / "model.safetensors"))
    assert [k for k in expected if not torch.equal(expected[k], got[k])] == []


@pytest.mark.parametrize("damaged", ["state.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_rank0.pt"])
def test_every_file_of_a_checkpoint_is_checked_before_anything_is_restored(tmp_path, damaged):
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for step in (1, 2):
        module(torch.randn(2, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
        save_checkpoint(tmp_path, step, module, optimizer, scheduler, {"fingerprint": "f"})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    truncate(tmp_path / "step_000002" / damaged, 0.3)
    with pytest.raises(InputFileError) as err:
        load_checkpoint(latest_checkpoint(tmp_path), module, optimizer, scheduler)
    message = str(err.value)
    assert str(tmp_path / "step_000002" / damaged) in message, message
    assert f"delete {tmp_path / 'step_000002'} to resume from step_000001" in message, message
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert scheduler.last_epoch == 2

    shutil.rmtree(tmp_path / "step_000002")
    assert load_checkpoint(latest_checkpoint(tmp_path), module, optimizer, scheduler)["step"] == 1
    assert scheduler.last_epoch == 1


def test_latest_pointer_to_a_missing_step_falls_back_and_no_step_means_none(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "step_000004").mkdir()
    (tmp_path / "step_000004" / "state.json").write_text(json.dumps({"step": 4}))
    (tmp_path / ".step_000005.tmp").mkdir()  # a write that was killed: never a checkpoint
    (tmp_path / "latest").write_text("step_000005")
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000004"
