"""Pipeline parallelism of backend=megatron against the HF backend, on CPU processes (gloo) through the test shim:
torchrun --nproc_per_node=2 tests/megatron_pipeline_check.py --pp 2 [--tp 1]   (test_megatron.py runs this)
torchrun --nproc_per_node=4 tests/megatron_pipeline_check.py --pp 2 --tp 2      (by hand: 4 processes on 2 cores)

Every process first computes the HF backend's results alone (before any process group exists: the HF path sums its
scores over all ranks), then converts the same model into its own TP shard of its pipeline stage and checks, for a
tied and an untied model: the logits; every activation score and Block Importance; drop-one and contiguous removal
scores for lm_loss and KL; and two plans applied and gathered back, bit for bit the HF backend's export: one that
leaves an uneven split (4 -> 3 layers) and one that empties the last stage (layers 2 and 3 removed). Prints one
`ok` line per process; the first disagreement raises.
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings

import torch
import torch.distributed as dist
from conftest import tiny_batch, tiny_model
from megatron_cpu import megatron_on_cpu

from llmprune.adapters import get_adapter
from llmprune.backends.megatron.adapter import MegatronGPTAdapter
from llmprune.data import to_batches
from llmprune.importance.activation import activation_scores
from llmprune.importance.depth import removal_scores
from llmprune.plan import make_plan

# hidden 48 -> 40, FFN 80 -> 48, 6 -> 4 heads in both groups (TP=2 keeps one group per rank), 4 -> 3 layers
UNEVEN = {"hidden_size": 40, "ffn_hidden_size": 48, "num_attention_heads": 4, "num_layers": 3}
EMPTY_LAST = {"hidden_size": 40, "num_layers": 2}  # with Block Importance forced to drop layers 2 and 3
CASES = [("llama", True), ("qwen3", False)]
DEPTH = {"drop_one": True, "block_sizes": (2,)}


def batches():
    ids = tiny_batch(4)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # right padding: it must not enter any score
    return to_batches(ids, 2, mask)


def check_close(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float, relative: bool) -> None:
    assert actual.shape == expected.shape, (name, tuple(actual.shape), tuple(expected.shape))
    diff = (actual - expected).abs().max().item() / (expected.abs().max().item() if relative else 1.0)
    assert diff <= tol, f"{name}: differs from the HF backend by {diff:.3g} > {tol}"


def check_equal_states(name: str, got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys(), (name, sorted(set(got) ^ set(expected)))
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, f"{name}: exported tensors differ from the HF backend's: {differ}"


def hf_reference(hf) -> dict:
    """The HF backend's scores, plans, pruned students' weights and logits (one process, no process group)."""
    adapter = get_adapter(hf)
    ref = {"logits": hf(input_ids=tiny_batch()).logits, "scores": activation_scores(hf, adapter, batches())}
    for metric in ("lm_loss", "kl"):
        ref.update(removal_scores(hf, adapter, batches(), metric=metric, **DEPTH))
    forced = {**ref["scores"], "block_importance": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    ref["plans"] = [make_plan(adapter.family, ref["scores"], adapter.dims(), UNEVEN, "block_importance",
                              rescale_norms=True),
                    make_plan(adapter.family, forced, adapter.dims(), EMPTY_LAST, "block_importance")]
    ref["students"] = []
    for plan in ref["plans"]:
        student = copy.deepcopy(hf)
        student = get_adapter(student).apply(plan)
        ref["students"].append((student.state_dict(), student(input_ids=tiny_batch()).logits))
    return ref


def check_case(hf, ref: dict, tp: int, pp: int) -> str:
    with torch.no_grad():
        adapter = MegatronGPTAdapter.from_hf(hf, tensor_parallel_size=tp, pipeline_parallel_size=pp)
        stages = adapter.stages
        assert [layer.layer_number - 1 for layer in adapter.layers] == list(stages.layer_ids), stages
        logits = adapter.lm_logits(tiny_batch())
        assert (logits is None) != stages.last
        if stages.last:
            check_close("logits", logits, ref["logits"], 1e-5, relative=False)

        scores = activation_scores(adapter.model, adapter, batches())
        names = {k.replace("pre_mlp_layernorm", "post_attention_layernorm"): k for k in scores}
        assert set(names) == set(ref["scores"]), sorted(set(names) ^ set(ref["scores"]))
        for hf_name, name in names.items():
            check_close(name, scores[name], ref["scores"][hf_name], 1e-5, relative=True)
        for metric in ("lm_loss", "kl"):
            for name, value in removal_scores(adapter.model, adapter, batches(), metric=metric, **DEPTH).items():
                check_close(name, value, ref[name], 1e-5, relative=False)

        for i, (plan, (state, student_logits)) in enumerate(zip(ref["plans"], ref["students"])):
            if i:  # a fresh conversion for the second plan
                adapter = MegatronGPTAdapter.from_hf(hf, tensor_parallel_size=tp, pipeline_parallel_size=pp)
            adapter.apply(plan)
            kept_here = [j for j in plan.kept_layers if j in stages.layer_ids]
            numbers = [plan.kept_layers.index(j) + 1 for j in kept_here]  # renumbered over all stages
            assert [layer.layer_number for layer in adapter.layers] == numbers, (plan.kept_layers, numbers)
            check_equal_states(f"plan {i}", adapter.to_hf(hf).state_dict(), state)
            logits = adapter.lm_logits(tiny_batch())
            if adapter.stages.last:
                check_close(f"plan {i} logits", logits, student_logits, 1e-5, relative=False)
    sizes = [adapter.stages.starts[p + 1] - adapter.stages.starts[p] for p in range(pp)]
    assert pp == 1 or sizes[-1] == 0, sizes  # the second plan removed every layer of the last stage
    tied = hf.config.tie_word_embeddings
    return f"{hf.config.model_type}-{'tied' if tied else 'untied'} (stage sizes after the last plan {sizes})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope).*", category=UserWarning)
    from megatron.core import parallel_state
    models = [tiny_model(family, tie_word_embeddings=tied) for family, tied in CASES]
    with torch.no_grad():
        refs = [hf_reference(hf) for hf in models]  # before the first conversion makes the process group
    with megatron_on_cpu():
        done = [check_case(hf, ref, args.tp, args.pp) for hf, ref in zip(models, refs)]
        rank = dist.get_rank()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    print(f"rank {rank}: ok TP={args.tp} PP={args.pp}: " + ", ".join(done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
