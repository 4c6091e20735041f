"""Calibration and held-out text: sources, packing, the held-out split and the not-enough-text errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_run_overrides
from transformers import AutoTokenizer

import llmprune
from llmprune import ConfigError
from llmprune.data import (
    MIN_PASSAGE_CHARS,
    dedupe_passages,
    embedded_documents,
    load_documents,
    split_stream,
    token_stream,
)


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


def test_dedupe_keeps_the_first_copy_of_each_passage_and_every_short_paragraph(tmp_path):
    long_a, long_b = "a" * MIN_PASSAGE_CHARS, "b b  b" + "b" * MIN_PASSAGE_CHARS
    docs = [f"Note:\n\n{long_a}\n\n{long_b}", f"Note:\n\n{long_a}", f"{long_a}\n\n{long_b.replace('  ', ' ')}", "x"]
    assert dedupe_passages(docs) == [docs[0], "Note:", "x"]  # whitespace-normalized match; empty documents go
    for name in ("a.txt", "b.txt"):  # user files lose exact repeats of a whole document only
        (tmp_path / name).write_text(docs[0], encoding="utf-8")
    (tmp_path / "c.txt").write_text(docs[1], encoding="utf-8")
    assert load_documents("files", [str(tmp_path)]) == [docs[0], docs[1]]


def test_embedded_text_has_each_passage_once_and_no_heldout_run_in_the_head(tiny_model_dirs):
    """The pydoc topics repeat passages (operator tables, container methods, ...). After de-duplication no paragraph
    of MIN_PASSAGE_CHARS+ characters appears twice, none is lost, and with a token per character no 128-token run of
    the held-out tail occurs anywhere in the head that calibration and distillation draw from (the raw text has
    thousands)."""
    from pydoc_data.topics import topics

    raw = [topics[key] for key in sorted(topics)]
    docs = embedded_documents()

    def long_paragraphs(texts):
        return [k for k in (" ".join(p.split()) for t in texts for p in t.split("\n\n")) if len(k) >= MIN_PASSAGE_CHARS]

    kept = long_paragraphs(docs)
    assert len(kept) == len(set(kept)) == len(set(long_paragraphs(raw))), (len(kept), len(set(kept)))
    assert len(long_paragraphs(raw)) - len(kept) > 300  # the repeats that went

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])  # one token per character
    eval_fraction = llmprune.load_config("smollm2_minitron").data.eval_fraction

    def runs_shared_with_head(texts, n=128):
        stream = token_stream(texts, tokenizer)
        splits = split_stream(stream, seq_len=32, num_samples=4, eval_samples=2, eval_fraction=eval_fraction)
        head, tail = stream[: splits.calib_region_tokens], stream[splits.calib_region_tokens:]
        # distillation / calibration windows are the head's, held-out ones the tail's
        assert torch.equal(splits.train.flatten(), head[: splits.train.numel()]) and len(tail) > 10_000
        assert torch.equal(splits.heldout.flatten(), tail[: splits.heldout.numel()])
        seen = {row.tobytes() for row in head.unfold(0, n, 1).numpy()}
        return sum(row.tobytes() in seen for row in tail.unfold(0, n, 1).numpy())

    assert runs_shared_with_head(docs) == 0
    assert runs_shared_with_head(raw) > 1000


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


def _dataset_dir(path, rows: list[dict]):
    path.mkdir()
    (path / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_hf_mix_shares_documents_by_weight_interleaves_them_and_renders_conversations(tmp_path):
    """data.mix over two local `datasets` folders: 2:1 weights of 9 documents give 6 + 3, spread evenly over the
    stream (so the held-out tail holds both), conversations through the chat template."""
    web = _dataset_dir(tmp_path / "web", [{"text": f"web page {i}"} for i in range(20)])
    chat = _dataset_dir(tmp_path / "chat", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                          {"role": "assistant", "content": f"a{i}"}]}
                                            for i in range(20)])
    mix = [{"dataset": web, "weight": 2.0}, {"dataset": chat, "text_field": "messages", "weight": 1.0}]

    def render(messages):
        return "".join(f"<|{m['role']}|>{m['content']}" for m in messages)

    docs = load_documents("hf", max_documents=9, mix=mix, render_chat=render)
    assert docs == ["web page 0", "<|user|>q0<|assistant|>a0", "web page 1", "web page 2",
                    "<|user|>q1<|assistant|>a1", "web page 3", "web page 4", "<|user|>q2<|assistant|>a2",
                    "web page 5"], docs
    plain = load_documents("hf", max_documents=3, mix=mix[1:])  # no template: the contents, blank-line joined
    assert plain == ["q0\n\na0", "q1\n\na1", "q2\n\na2"]


def test_unreachable_corpus_falls_back_to_embedded_text_only_when_asked(tiny_model_dirs, tmp_path, llmprune_log):
    from llmprune.errors import CorpusUnreachable

    settings = ["data.source=hf", "data.mix=[{dataset: nobody/no-such-corpus, weight: 1.0}]", "distill.max_steps=0",
                "prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48"]
    with pytest.raises(CorpusUnreachable, match="nobody/no-such-corpus"):
        llmprune.run("smollm2_minitron", tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "a", *settings))
    assert not (tmp_path / "a" / "importance.safetensors").exists()
    report = llmprune.run("smollm2_minitron", tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "b", *settings,
                                                                 "data.fallback=embedded"))
    assert report["data"]["source"] == "embedded"
    assert any("nobody/no-such-corpus" in line and "data.fallback=embedded" in line for line in llmprune_log)
