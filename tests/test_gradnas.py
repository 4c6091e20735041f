"""GradNAS: mask hooks are exact, scores equal squared finite differences of the loss, the named losses have a
gradient at mask = 1 (a loss against the model's own outputs has none), and both budget searches fit the budget,
are monotone in it and (knapsack) match a brute force."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import tiny_model

from llmprune.data import Batch
from llmprune.importance.gradnas import (
    LabeledBatch,
    contrastive_pairs,
    gradnas_scores,
    mask_tokens,
    resolve_loss,
    unit_masks,
)
from llmprune.plan.gradnas_search import (
    LinearCost,
    gradnas_widths,
    kept_units,
    knapsack_search,
    threshold_search,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 64
TOKENIZER = SimpleNamespace(mask_token_id=4, cls_token_id=2, sep_token_id=3, all_special_ids=[0, 1, 2, 3, 4])
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, initializer_range=0.1)


def bert(model_class: str = "BertForMaskedLM", **extra):
    torch.manual_seed(0)
    return getattr(transformers, model_class)(transformers.BertConfig(**BERT, **extra)).eval()


def gptj():
    torch.manual_seed(0)
    config = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=48,
                                     n_positions=64, bos_token_id=0, eos_token_id=1, initializer_range=0.1)
    return transformers.GPTJForCausalLM(config).eval()


def llama(family: str = "llama"):
    return tiny_model(family, num_hidden_layers=2, vocab_size=VOCAB)  # GQA: 6 query heads in 2 KV groups


# (model, loss) cases; sequence classification batches carry labels
CASES = {
    "bert_mlm": (lambda: bert(), "mlm"),
    "minilm_contrastive": (lambda: bert("BertModel"), "contrastive"),
    "bert_task": (lambda: bert("BertForSequenceClassification", num_labels=3), "task"),
    "gptj_causal": (gptj, "causal_lm"),
    "llama_causal": (llama, "causal_lm"),
    "qwen3_causal": (lambda: llama("qwen3"), "causal_lm"),
}


def batch(seed: int = 0, rows: int = 4, seq: int = 16, padded: bool = True) -> LabeledBatch:
    gen = torch.Generator().manual_seed(seed)
    attention = torch.ones(rows, seq, dtype=torch.long)
    if padded:
        attention[0, -3:] = 0  # one padded row: padding must be neither masked nor scored
    return LabeledBatch(torch.randint(5, VOCAB, (rows, seq), generator=gen), attention,
                        torch.randint(0, 3, (rows,), generator=gen))


def scores_of(model, loss: str, batches) -> dict[str, torch.Tensor]:
    return gradnas_scores(model, batches, loss, tokenizer=TOKENIZER)


def loss_at(model, loss_fn, prepared, masks, name: str, unit: int, value: float) -> float:
    with torch.no_grad():
        masks[name][unit] = value
        out = loss_fn(model, prepared).item()
        masks[name][unit] = 1.0
    return out


# -- masks --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_masks_at_one_change_nothing_and_masks_act(case):
    model = CASES[case][0]()
    b = batch()
    with torch.no_grad():
        plain = model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
        with unit_masks(model) as masks:
            hooked = model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
            masks["heads.0"][1] = 0.0
            one_head_off = model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
        after = model(input_ids=b.input_ids, attention_mask=b.attention_mask)[0]
    assert torch.equal(plain, hooked), (plain - hooked).abs().max()
    assert not torch.allclose(plain, one_head_off), "zeroing a head mask changed nothing: the hook is not applied"
    assert torch.equal(plain, after), "hooks survived the context"
    heads = model.config.num_attention_heads
    assert all(masks[f"heads.{i}"].shape == (heads,) for i in range(2)), {k: m.shape for k, m in masks.items()}


@pytest.mark.parametrize("case", CASES)
def test_score_is_squared_finite_difference(case):
    build, loss = CASES[case]
    model = build().double()
    b = batch()
    scores = scores_of(model, loss, [b])
    loss_fn, (prepared,) = resolve_loss(loss, [b], TOKENIZER, seed=0)  # the same MLM masking as in the scores
    # Llama's RMSNorm runs in float32 even in a float64 model, so the loss is float32-precise: a 5-point stencil
    # with a large step (exact in the float32 mask) keeps truncation and rounding error under 1e-3.
    h = 2.0**-4
    with unit_masks(model) as masks:
        for name in ("heads.0", "ffn.1", "heads.1"):
            for unit in {0, int(scores[name].argmax())}:
                f = [loss_at(model, loss_fn, prepared, masks, name, unit, 1 + k * h) for k in (-2, -1, 1, 2)]
                fd = ((8 * (f[2] - f[1]) - (f[3] - f[0])) / (12 * h)) ** 2
                score = scores[name][unit].item()
                assert fd == pytest.approx(score, rel=1e-3, abs=1e-6 * scores[name].max().item()), (name, unit)


def test_scores_sum_squared_gradients_over_batches():
    model = llama().double()
    b1, b2 = batch(1), batch(2)
    both = scores_of(model, "causal_lm", [b1, b2])
    one, two = scores_of(model, "causal_lm", [b1]), scores_of(model, "causal_lm", [b2])
    for name in both:
        assert torch.allclose(both[name], one[name] + two[name], rtol=1e-6), name


@pytest.mark.parametrize("case", CASES)
def test_named_losses_have_gradient_at_one(case):
    build, loss = CASES[case]
    scores = scores_of(build(), loss, [batch()])
    assert all(s.dtype == torch.float32 and s.sum() > 0 for s in scores.values()), \
        {name: s.sum().item() for name, s in scores.items()}


def test_distance_to_own_outputs_has_no_gradient():
    """KL to the unpruned model's own logits is at its minimum at mask = 1: every score is zero, which is why no
    such loss is offered."""
    model = llama().double()
    b = batch()
    with torch.no_grad():
        teacher = F.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, dim=-1)

    def kl_to_self(model, batch):
        student = F.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, dim=-1)
        return F.kl_div(student, teacher, log_target=True, reduction="batchmean")

    real = gradnas_scores(model, [b], "causal_lm")
    self_kl = gradnas_scores(model, [b], kl_to_self)
    for name in real:
        assert self_kl[name].max() <= 1e-20 * real[name].max(), (name, self_kl[name].max(), real[name].max())


@pytest.mark.parametrize("case", ["bert_mlm", "llama_causal", "gptj_causal"])
def test_zeroed_output_columns_score_exactly_zero(case):
    build, loss = CASES[case]
    model = build()
    sites = {"bert_mlm": ("bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense"),
             "llama_causal": ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
             "gptj_causal": ("transformer.h.0.attn.out_proj", "transformer.h.1.mlp.fc_out")}[case]
    attn_out, ffn_out = (model.get_submodule(name) for name in sites)
    head_dim = attn_out.in_features // model.config.num_attention_heads
    with torch.no_grad():
        attn_out.weight[:, 2 * head_dim: 3 * head_dim] = 0
        ffn_out.weight[:, 5] = 0
    scores = scores_of(model, loss, [batch()])
    assert scores["heads.0"][2] == 0 and scores["ffn.1"][5] == 0, (scores["heads.0"], scores["ffn.1"][5])
    assert (scores["heads.0"] > 0).sum() == len(scores["heads.0"]) - 1, scores["heads.0"]


def test_scoring_leaves_the_model_as_it_was():
    model = bert()
    model.train()
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    scores_of(model, "mlm", [batch()])
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


# -- loss inputs and errors ---------------------------------------------------------------------------------------


def test_mask_tokens_masks_fifteen_percent_of_real_tokens():
    b = batch(rows=8, seq=40)
    b.input_ids[:, 0] = TOKENIZER.cls_token_id
    masked = mask_tokens(b, TOKENIZER.mask_token_id, TOKENIZER.all_special_ids, torch.Generator().manual_seed(0))
    chosen = masked.labels != -100
    eligible = (b.attention_mask == 1) & (b.input_ids != TOKENIZER.cls_token_id)
    assert not (chosen & ~eligible).any(), "padding or a special token was masked"
    assert torch.equal(chosen.sum(1), (eligible.sum(1) * 0.15).round().long()), chosen.sum(1)
    assert torch.equal(masked.input_ids[chosen], torch.full_like(masked.input_ids[chosen], 4))
    assert torch.equal(masked.labels[chosen], b.input_ids[chosen])
    again = mask_tokens(b, TOKENIZER.mask_token_id, TOKENIZER.all_special_ids, torch.Generator().manual_seed(0))
    assert torch.equal(again.labels, masked.labels), "the seed does not fix the masking"


def test_contrastive_pairs_split_each_window_and_wrap_it():
    b = batch(padded=False)
    anchor, positive = contrastive_pairs(b, TOKENIZER.cls_token_id, TOKENIZER.sep_token_id)
    assert torch.equal(anchor.input_ids[:, 1:-1], b.input_ids[:, :8])
    assert torch.equal(positive.input_ids[:, 1:-1], b.input_ids[:, 8:])
    assert (anchor.input_ids[:, 0] == 2).all() and (positive.input_ids[:, -1] == 3).all()


def test_loss_errors_say_what_to_do():
    with pytest.raises(ValueError, match="Known: mlm, causal_lm, task, contrastive"):
        gradnas_scores(llama(), [batch()], "kl")
    with pytest.raises(ValueError, match="tokenizer"):
        gradnas_scores(bert(), [batch()], "mlm")
    with pytest.raises(ValueError, match="contrastive"):
        scores_of(bert("BertModel"), "mlm", [batch()])
    with pytest.raises(ValueError, match="labels"):
        gradnas_scores(bert("BertForSequenceClassification"), [Batch(batch().input_ids)], "task")
    with pytest.raises(ValueError, match="at least 2 rows"):
        scores_of(bert("BertModel"), "contrastive", [batch(rows=1)])
    mamba = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(hidden_size=16, num_hidden_layers=1,
                                                                     num_heads=4, head_dim=8, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="Known: bert"):
        gradnas_scores(mamba, [batch()], "causal_lm")


# -- budget search ------------------------------------------------------------------------------------------------

COST = LinearCost(base=100, per_head=7, per_neuron=2)


def random_scores(layers: int = 3, heads: int = 4, neurons: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        out[f"heads.{i}"] = torch.rand(heads, generator=gen) * (i + 1)  # layers differ in scale
        out[f"ffn.{i}"] = torch.rand(neurons, generator=gen).square()
    return out


def full_cost(scores: dict[str, torch.Tensor]) -> float:
    layers = len(scores) // 2
    return COST.of([len(scores[f"heads.{i}"]) for i in range(layers)], [len(scores[f"ffn.{i}"]) for i in range(layers)])


def top_mass(scores: torch.Tensor, k: int) -> float:
    return scores.double().sort(descending=True).values[:k].sum().item()


def pruned_mass(scores: torch.Tensor, k: int) -> float:
    return 1 - top_mass(scores, k) / scores.double().sum().item()


@pytest.mark.parametrize("rule", ["threshold", "knapsack"])
@pytest.mark.parametrize("neuron_step", [1, 4])
def test_search_fits_budget_on_the_grid_and_is_monotone(rule, neuron_step):
    scores = random_scores()
    previous = None
    for budget in range(100, int(full_cost(scores)) + 20, 9):
        widths = gradnas_widths(rule, scores, COST, budget, neuron_step=neuron_step)
        assert widths.cost == COST.of(widths.heads, widths.neurons) <= budget, (budget, widths)
        assert all(n % neuron_step == 0 or n == 10 for n in widths.neurons), widths.neurons
        kept = kept_units(scores, widths)
        for i in range(3):
            for name, k in ((f"heads.{i}", widths.heads[i]), (f"ffn.{i}", widths.neurons[i])):
                assert len(kept[name]) == k, (name, kept[name], k)
                assert scores[name][kept[name]].sum() == pytest.approx(top_mass(scores[name], k)), name
        if previous is not None:
            assert widths.importance >= previous.importance - 1e-12, (budget, previous, widths)
            if rule == "threshold":  # one threshold: a larger budget never keeps less anywhere
                assert all(a >= b for a, b in zip(widths.heads + widths.neurons, previous.heads + previous.neurons))
        if rule == "threshold" and widths.cost < full_cost(scores):  # one step more would not have fit
            assert budget - widths.cost < max(COST.per_head, COST.per_neuron * neuron_step), (budget, widths)
        previous = widths


def test_threshold_keeps_the_smallest_choice_under_one_threshold():
    scores = random_scores(layers=4, neurons=12, seed=3)
    widths = threshold_search(scores, COST, budget=0.6 * full_cost(scores))
    kept = {f"heads.{i}": k for i, k in enumerate(widths.heads)} | {f"ffn.{i}": k for i, k in enumerate(widths.neurons)}
    threshold = max(pruned_mass(scores[name], k) for name, k in kept.items())
    for name, k in kept.items():
        smallest = min(c for c in range(len(scores[name]) + 1) if pruned_mass(scores[name], c) <= threshold + 1e-12)
        assert k == smallest, (name, k, smallest, threshold)


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_matches_brute_force(seed):
    """Over every per-layer choice of counts (each keeping its layer's top units): cost depends only on the totals,
    so the knapsack over global (h, n) prefixes is the true optimum."""
    scores = random_scores(layers=2, heads=3, neurons=4, seed=seed)
    cost = LinearCost(base=10, per_head=5, per_neuron=2)
    for budget in (10, 17, 25, 33, 41):
        best = max(top_mass(scores["heads.0"], h0) + top_mass(scores["heads.1"], h1)
                   + top_mass(scores["ffn.0"], n0) + top_mass(scores["ffn.1"], n1)
                   for h0, h1, n0, n1 in itertools.product(range(4), range(4), range(5), range(5))
                   if cost.of([h0, h1], [n0, n1]) <= budget)
        assert knapsack_search(scores, cost, budget).importance == pytest.approx(best), budget


@pytest.mark.parametrize("rule", ["threshold", "knapsack"])
def test_impossible_budget_names_the_achievable_range(rule):
    with pytest.raises(ValueError, match=r"achievable range is \[100, 244\]"):
        gradnas_widths(rule, random_scores(), COST, budget=99)


def test_unknown_rule_lists_the_rules():
    with pytest.raises(ValueError, match="Known: threshold, knapsack"):
        gradnas_widths("greedy", random_scores(), COST, budget=200)


def test_scores_to_widths_end_to_end():
    model = llama()
    scores = scores_of(model, "causal_lm", [batch()])
    budget = COST.of([3, 3], [40, 40])
    widths = knapsack_search(scores, COST, budget)
    kept = kept_units(scores, widths)
    assert widths.cost <= budget and sum(len(kept[f"heads.{i}"]) for i in range(2)) == sum(widths.heads), widths
