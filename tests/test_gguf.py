"""GGUF export: metadata and tensors read back with gguf.GGUFReader, and llama.cpp (xllamacpp) generating the same
greedy tokens as transformers from the exported file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_model

from llmprune.errors import ConfigError
from llmprune.export.gguf import check_gguf_family, write_gguf
from llmprune.export.llama_cpp import LlamaCpp

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the pruned shape: head_dim 16 while hidden / heads = 48 / 6 = 8, so key_length must be written, not derived
PRUNED = {"head_dim": 16, "initializer_range": 0.2}  # larger weights: greedy choices far from ties


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A tiny byte-level BPE (gpt2-style) tokenizer over ASCII text: every token is whole UTF-8, so llama.cpp
    reports each generated id (it withholds partial characters)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [f"the quick brown fox jumps over the lazy dog {i} times; pack my box!" for i in range(50)]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                   chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, reader


def _deinterleave(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of the export's q/k reordering, written independently: pairs (2i, 2i+1) back to halves."""
    head_dim = weight.shape[0] // n_heads
    heads = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    return np.concatenate([heads[:, :, 0], heads[:, :, 1]], axis=1).reshape(weight.shape)


def test_metadata_read_back_matches_config(tmp_path, bpe_tokenizer):
    model = tiny_model("llama", vocab_size=len(bpe_tokenizer), rope_theta=50000.0, **PRUNED)
    c = model.config
    info = write_gguf(model, bpe_tokenizer, tmp_path / "model.gguf", "f16")
    fields, reader = _fields(tmp_path / "model.gguf")
    expected = {"general.architecture": "llama", "llama.context_length": c.max_position_embeddings,
                "llama.embedding_length": 48, "llama.block_count": 4, "llama.feed_forward_length": 80,
                "llama.attention.head_count": 6, "llama.attention.head_count_kv": 2,
                "llama.attention.key_length": 16, "llama.attention.value_length": 16,
                "llama.rope.dimension_count": 16, "llama.vocab_size": len(bpe_tokenizer),
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 0,
                "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 1,
                "tokenizer.chat_template": bpe_tokenizer.chat_template}
    got = {key: fields.get(key) for key in expected}
    assert got == expected, {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert fields["llama.rope.freq_base"] == pytest.approx(50000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)
    vocab = sorted(bpe_tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    assert fields["tokenizer.ggml.tokens"] == [t for t, _ in vocab]
    assert fields["tokenizer.ggml.token_type"][:3] == [gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
                                                       gguf.TokenType.NORMAL]
    assert len(fields["tokenizer.ggml.merges"]) == info["merges"] > 0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert len(types) == 2 + 1 + 9 * 4, sorted(types)  # embeddings, output norm, untied output, 9 per layer


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_tensors_read_back_exactly(tmp_path, bpe_tokenizer, family):
    """f32 tensors equal the HF weights bit for bit once the llama graph's q/k reordering is undone (qwen3: none;
    qwen2 is written for the llama graph, biases reordered too)."""
    model = tiny_model(family, vocab_size=len(bpe_tokenizer), **PRUNED)
    write_gguf(model, bpe_tokenizer, tmp_path / "model.gguf", "f32")
    _, reader = _fields(tmp_path / "model.gguf")
    back = {t.name: np.asarray(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}
    hf = model.state_dict()
    for i in range(4):
        for proj, heads in (("q", 6), ("k", 2)):
            for kind in ("weight", "bias") if family == "qwen2" else ("weight",):
                name = f"blk.{i}.attn_{proj}.{kind}"
                original = hf[f"model.layers.{i}.self_attn.{proj}_proj.{kind}"].numpy()
                if family != "qwen3":  # reordered for llama.cpp's interleaved rotary: different until undone
                    assert not np.array_equal(back[name], original), name
                    back[name] = _deinterleave(back[name], heads)
                assert np.array_equal(back[name], original), (name, np.abs(back[name] - original).max())
    assert np.array_equal(back["blk.3.ffn_down.weight"], hf["model.layers.3.mlp.down_proj.weight"].numpy())
    assert np.array_equal(back["token_embd.weight"], hf["model.embed_tokens.weight"].numpy())
    if family == "qwen3":
        assert np.array_equal(back["blk.1.attn_k_norm.weight"], hf["model.layers.1.self_attn.k_norm.weight"].numpy())


@pytest.mark.parametrize("gguf_type,qtype,tol", [("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)])
def test_compressed_types_dequantize_close(tmp_path, bpe_tokenizer, gguf_type, qtype, tol):
    model = tiny_model("llama", vocab_size=len(bpe_tokenizer), hidden_size=96, intermediate_size=64, head_dim=16)
    write_gguf(model, bpe_tokenizer, tmp_path / "model.gguf", gguf_type)
    _, reader = _fields(tmp_path / "model.gguf")
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert down.tensor_type == getattr(gguf.GGMLQuantizationType, qtype)
    values = gguf.quants.dequantize(down.data, down.tensor_type).reshape(96, 64)
    original = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert np.abs(values - original).max() <= tol * np.abs(original).max()


def test_unsupported_models_fail_with_the_fix(tmp_path, bpe_tokenizer):
    with pytest.raises(ConfigError, match="llama-like families.*mamba2.*export.formats=\\[hf\\]"):
        check_gguf_family("mamba2")
    from conftest import save_tiny
    from transformers import AutoTokenizer

    word_level = AutoTokenizer.from_pretrained(save_tiny("llama", tmp_path / "tiny"))
    with pytest.raises(ConfigError, match="byte-level BPE.*WordLevel"):
        write_gguf(tiny_model("llama"), word_level, tmp_path / "model.gguf", "f32")
    assert not (tmp_path / "model.gguf").exists()


def _llama_cpp_greedy(path, prompt: list[int], n: int) -> list[int]:
    return LlamaCpp(path, n_ctx=256, threads=1).greedy(prompt, n)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_llama_cpp_continues_like_transformers(tmp_path, bpe_tokenizer, family):
    model = tiny_model(family, vocab_size=len(bpe_tokenizer), **PRUNED)
    write_gguf(model, bpe_tokenizer, tmp_path / "model.gguf", "f32")
    prompt = [0, *bpe_tokenizer("the lazy dog")["input_ids"]]
    with torch.no_grad():
        ours = model.generate(torch.tensor([prompt]), max_new_tokens=40, min_new_tokens=40, do_sample=False)
    expected = ours[0, len(prompt):].tolist()
    got = _llama_cpp_greedy(tmp_path / "model.gguf", prompt, 40)
    assert got == expected, (got, expected)


def test_llama_cpp_perplexity_of_f16_file_matches_transformers(tmp_path, bpe_tokenizer):
    """Teacher-forced log-probabilities from llama.cpp: the f32 file's equal transformers' per token, the f16 file's
    perplexity is within 1%."""
    from llmprune.data import to_batches
    from llmprune.evaluate import evaluate

    model = tiny_model("llama", vocab_size=len(bpe_tokenizer), **PRUNED)
    windows = torch.randint(2, len(bpe_tokenizer), (3, 24), generator=torch.Generator().manual_seed(0))  # (N, S)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(windows[:1]).logits[0, :-1].float(), -1)  # (S-1, V)
    expected = logprobs.gather(-1, windows[0, 1:, None])[:, 0]
    write_gguf(model, bpe_tokenizer, tmp_path / "f32.gguf", "f32")
    got = torch.tensor(LlamaCpp(tmp_path / "f32.gguf", n_ctx=64, threads=1).logprobs(windows[0].tolist()))
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    ours = evaluate(model, to_batches(windows, 3))["perplexity"]
    write_gguf(model, bpe_tokenizer, tmp_path / "f16.gguf", "f16")
    theirs = LlamaCpp(tmp_path / "f16.gguf", n_ctx=64, threads=1).perplexity(windows)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


@pytest.mark.slow
def test_pruned_smollm2_in_llama_cpp(tmp_path, smollm2_loaded):
    """The real model pruned to hidden 448 / FFN 1024 (head_dim 64 while 448 / 9 heads is no integer)."""
    import llmprune
    from llmprune.data import embedded_documents, token_stream

    model, tokenizer, _ = smollm2_loaded
    calib = token_stream(embedded_documents(), tokenizer)[: 4 * 64].reshape(4, 64)  # (N, S)
    pruned, _ = llmprune.prune(model, export_config={"hidden_size": 448, "ffn_hidden_size": 1024},
                               calib_data=calib, batch_size=2, depth_samples=2, seq_len=64)
    info = write_gguf(pruned, tokenizer, tmp_path / "model.gguf", "f32")
    assert (info["embedding_length"], info["feed_forward_length"], info["key_length"]) == (448, 1024, 64)
    assert info["tokenizer_pre"] in ("smollm", "gpt-2")
    prompt = tokenizer("The capital of France is a city where")["input_ids"]
    with torch.no_grad():
        ours = pruned.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    expected = ours[0, len(prompt):].tolist()
    got = _llama_cpp_greedy(tmp_path / "model.gguf", prompt, 32)
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
    # f16, the type users ship: held-out perplexity in llama.cpp within 1% of transformers'
    from llmprune.data import split_stream, to_batches
    from llmprune.evaluate import evaluate

    heldout = split_stream(token_stream(embedded_documents(), tokenizer), 96, 4, 2, 0.1, 0).heldout
    write_gguf(pruned, tokenizer, tmp_path / "f16.gguf", "f16")
    ours = evaluate(pruned, to_batches(heldout, 2))["perplexity"]
    theirs = LlamaCpp(tmp_path / "f16.gguf", n_ctx=128).perplexity(heldout)
    assert abs(theirs / ours - 1) < 0.01, (theirs, ours)


def test_pipeline_writes_gguf_next_to_each_stage(tmp_path, bpe_tokenizer):
    """export.formats=[hf,gguf] through the CLI's run: pruned/ and final/ each hold a model.gguf of the pruned shape
    (hidden 40 with 6 heads: the Mistral fallback, still the llama graph)."""
    from conftest import tiny_run_overrides

    import llmprune

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(bpe_tokenizer)).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    report = llmprune.run("smollm2_minitron", tiny_run_overrides(
        model_dir, out, "prune.export_config.hidden_size=40", "prune.export_config.ffn_hidden_size=48",
        "export.formats=[hf,gguf]", "export.gguf_type=q8_0"))
    for stage in ("pruned", "final"):
        fields, _ = _fields(out / stage / "model.gguf")
        assert (fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (40, 48), stage
        assert fields["llama.attention.key_length"] == 8
        assert report["gguf"][stage]["type"] == "q8_0"


def test_validation_lists_gguf_problems(tmp_path):
    import json

    import llmprune

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(ConfigError) as err:
        llmprune.load_config("smollm2_minitron", [f"model.path={tmp_path}", "export.formats=[gguf,onnx]"])
    message = str(err.value)
    assert "'onnx' is not one of: hf, gguf" in message and "must contain hf" in message
    assert "'mamba2' model" in message, message


def test_exported_gguf_reloads_exactly_and_prunes_again(tmp_path, bpe_tokenizer):
    """Round trip: pruned/model.gguf (f32) loads back through transformers with the q/k reordering undone (same
    logits as pruned/), and serves as model.path of a second run that prunes it further."""
    from conftest import tiny_run_overrides
    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.models import load_model

    model_dir = tmp_path / "model"
    tiny_model("llama", vocab_size=len(bpe_tokenizer), **PRUNED).save_pretrained(model_dir)
    bpe_tokenizer.save_pretrained(model_dir)
    first = tmp_path / "first"
    llmprune.run("smollm2_minitron", tiny_run_overrides(
        model_dir, first, "prune.export_config.hidden_size=null", "prune.export_config.ffn_hidden_size=48",
        "prune.export_config.num_attention_heads=4",
        "export.formats=[hf,gguf]", "export.gguf_type=f32", "distill.max_steps=0"))
    reloaded, _, source = load_model(str(first / "pruned" / "model.gguf"), device="cpu")
    assert source.gguf_file == "model.gguf"
    hf = AutoModelForCausalLM.from_pretrained(first / "pruned")
    ids = torch.randint(2, len(bpe_tokenizer), (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, hf(ids).logits, atol=1e-5)
    second = tmp_path / "second"
    report = llmprune.run("smollm2_minitron", tiny_run_overrides(
        first / "pruned" / "model.gguf", second, "prune.export_config.ffn_hidden_size=32",
        "prune.export_config.hidden_size=40", "distill.max_steps=0"))
    assert report["original"]["ffn_hidden_size"] == 48 and report["original"]["num_attention_heads"] == 4
    assert (report["target"]["ffn_hidden_size"], report["target"]["hidden_size"]) == (32, 40)
    assert (second / "pruned" / "config.json").is_file()


def test_gguf_is_converted_once_and_loads_from_the_kept_copy_identically(tmp_path, bpe_tokenizer, monkeypatch):
    """Parsing a GGUF's metadata dominates its load (5x the copy's time for SmolLM2), so the converted checkpoint is
    kept: the second load reads it and gives the same logits, token ids and chat template; a damaged copy or a
    changed file is converted again; LLMPRUNE_CACHE=off keeps nothing."""
    from llmprune.models import converted_gguf, load_model, resolve_source

    path = tmp_path / "model.gguf"
    write_gguf(tiny_model("llama", vocab_size=len(bpe_tokenizer), **PRUNED), bpe_tokenizer, path, "f32")
    monkeypatch.setenv("LLMPRUNE_CACHE", "off")
    direct, direct_tok, _ = load_model(str(path), device="cpu")
    assert converted_gguf(resolve_source(str(path))) is None
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    kept = converted_gguf(resolve_source(str(path)))
    first, _, _ = load_model(str(path), device="cpu")
    assert (kept / "config.json").is_file() and (kept / "model.safetensors").is_file()
    from safetensors.torch import load_file, save_file

    weights = load_file(kept / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] + 1
    save_file(weights, kept / "model.safetensors", metadata={"format": "pt"})
    marked, _, _ = load_model(str(path), device="cpu")
    assert torch.equal(marked.lm_head.weight, direct.lm_head.weight + 1), "the next load reads the kept copy"
    (kept / "model.safetensors").write_bytes(b"damaged")
    again, _, _ = load_model(str(path), device="cpu")  # a damaged copy is converted again
    assert torch.equal(again.lm_head.weight, direct.lm_head.weight)
    cached, cached_tok, source = load_model(str(path), dtype="bfloat16", device="cpu")
    assert source.gguf_file == "model.gguf", "the source is still the GGUF (reports, calibration fingerprint)"
    assert next(cached.parameters()).dtype == torch.bfloat16 and getattr(cached.config, "quantization_config",
                                                                         None) is None
    ids = torch.randint(2, len(bpe_tokenizer), (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(first(ids).logits, direct(ids).logits)
    for (name, a), (_, b) in zip(cached.named_parameters(), direct.named_parameters(), strict=True):
        assert torch.equal(a, b.to(torch.bfloat16)), name
    text = "the lazy dog packs my box"
    assert cached_tok(text).input_ids == direct_tok(text).input_ids
    assert cached_tok.chat_template == direct_tok.chat_template
    path.write_bytes(path.read_bytes())  # same bytes, new modification time: another version of the file
    assert converted_gguf(resolve_source(str(path))) != kept
