"""Calibration and held-out text: sources, packing, the held-out split and the not-enough-text errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_overrides
from transformers import AutoTokenizer

import llmprune
from llmprune import ConfigError
from llmprune.data import embedded_documents, load_documents, split_stream, token_stream


def test_heldout_tail_is_disjoint_from_calibration():
    stream = torch.arange(10_000)  # every token id is its own position
    splits = split_stream(stream, seq_len=50, num_samples=40, eval_samples=8, eval_fraction=0.2, seed=3)
    cut = 8_000
    assert splits.calib.shape == (40, 50) and splits.heldout.shape == (8, 50)
    assert int(splits.calib.max()) < cut <= int(splits.heldout.min()), (splits.calib.max(), splits.heldout.min())
    assert set(splits.calib.flatten().tolist()).isdisjoint(splits.heldout.flatten().tolist())
    # packed windows: contiguous runs aligned to seq_len, no window twice, no padding
    assert torch.equal(splits.calib - splits.calib[:, :1], torch.arange(50).expand(40, 50))
    assert (splits.calib[:, 0] % 50 == 0).all() and len(set(splits.calib[:, 0].tolist())) == 40
    assert torch.equal(splits.heldout.flatten(), torch.arange(cut, cut + 400))
    assert splits.calib_region_tokens == cut and splits.stream_tokens == 10_000
    # distillation trains on every window of the head: never on a held-out token, and calibration is among them
    assert int(splits.train.max()) < cut and set(splits.train.flatten().tolist()).isdisjoint(
        splits.heldout.flatten().tolist())
    assert {tuple(w) for w in splits.calib.tolist()} <= {tuple(w) for w in splits.train.tolist()}


def test_calibration_windows_depend_on_seed_only():
    stream = torch.arange(10_000)
    a = split_stream(stream, 50, 10, 2, 0.1, seed=0).calib
    assert torch.equal(a, split_stream(stream, 50, 10, 2, 0.1, seed=0).calib)
    assert not torch.equal(a, split_stream(stream, 50, 10, 2, 0.1, seed=1).calib)


def test_not_enough_tokens_errors():
    with pytest.raises(ConfigError) as err:
        split_stream(torch.arange(1000), seq_len=100, num_samples=20, eval_samples=2, eval_fraction=0.1)
    message = str(err.value)
    assert "data.num_samples=20 needs 2000 calibration tokens but the text gives 900" in message, message
    assert "lower data.num_samples or data.seq_len" in message
    with pytest.raises(ConfigError, match="held-out tail has 50 tokens, less than data.seq_len=100"):
        split_stream(torch.arange(1000), seq_len=100, num_samples=2, eval_samples=2, eval_fraction=0.05)


def test_files_source_reads_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines", encoding="utf-8")
    rows = [{"body": "second", "id": 1}, {"body": "third", "id": 2}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_documents("files", [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], text_field="body")
    assert docs == ["first document\nwith two lines", "second", "third"]
    (tmp_path / "ignored.csv").write_text("x,y")
    assert load_documents("files", [str(tmp_path)], text_field="body") == docs  # a folder: its .txt / .jsonl


def test_jsonl_without_the_text_field_names_line_and_keys(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "ok"}\n{"content": "no text key", "id": 3}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_documents("files", [str(path)], text_field="text")
    message = str(err.value)
    assert f"{path}:2 has no key 'text'" in message and "data.text_field=<key>" in message, message
    assert "keys here: content, id" in message


def test_token_stream_joins_documents_with_eos(tiny_model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    stream = token_stream(["ab", "   ", "cd"], tokenizer)  # blank documents are skipped
    eos = tokenizer.eos_token_id
    assert stream.tolist() == [*tokenizer("ab", add_special_tokens=False)["input_ids"], eos,
                               *tokenizer("cd", add_special_tokens=False)["input_ids"], eos]
    assert sum(map(len, embedded_documents())) > 300_000  # the default source: enough text for every recipe


def test_run_with_files_source(tiny_model_dirs, tmp_path):
    text = " ".join(f"line {i} of a small calibration corpus." for i in range(200))  # ~7K characters = tokens
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"body": text[i: i + 500]})
                                                      for i in range(0, len(text), 500)), encoding="utf-8")
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "run", "data.source=files",
                                   f"data.paths=[{tmp_path / 'corpus.jsonl'}]", "data.text_field=body",
                                   "prune.export_config.hidden_size=36", "prune.export_config.ffn_hidden_size=null")
    report = llmprune.run("smollm2_minitron", overrides)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    docs = load_documents("files", [str(tmp_path / "corpus.jsonl")], text_field="body")
    assert report["data"] == {"source": "files", "stream_tokens": len(token_stream(docs, tokenizer)),
                              "calibration_tokens": 4 * 32, "heldout_tokens": 2 * 32}

    (tmp_path / "short.txt").write_text("too short", encoding="utf-8")
    overrides[overrides.index(f"data.paths=[{tmp_path / 'corpus.jsonl'}]")] = f"data.paths=[{tmp_path / 'short.txt'}]"
    with pytest.raises(ConfigError, match="data.num_samples=4 needs 128 calibration tokens"):
        llmprune.run("smollm2_minitron", overrides)
