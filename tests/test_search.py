"""The Minitron architecture search (llmprune/search): the grid and its costs, budgets, latency caching, ranking with
resume, and the Pareto front; tiny random llama models, seconds each."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_run_overrides
from helpers import random_unit_scores, real_param_count

import llmprune
from llmprune.adapters import get_adapter
from llmprune.errors import ConfigError
from llmprune.plan import choose_layers, make_plan
from llmprune.search.latency import LatencyMeter
from llmprune.search.pareto import dominates, front_of, knee, nsga2, pareto_front, pick, plot_front, write_csv
from llmprune.search.rank import rank, spearman
from llmprune.search.space import SearchSpace, candidate_key, search_choices
from llmprune.search.state import SearchState

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = {"hidden_size": 0.5, "ffn_hidden_size": 0.5, "num_attention_heads": 0.5, "num_layers": 0.5}
DIVISORS = {"hidden_size": 8, "ffn_hidden_size": 16, "num_layers": 1}


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama")
    return model, get_adapter(model)


def make_space(adapter, **kwargs) -> SearchSpace:
    dims = adapter.dims()
    return SearchSpace(adapter.cost_model(), dims, search_choices(dims, DIVISORS, WIDTHS), seq_len=32, **kwargs)


def test_grid_follows_divisors_and_lowest_fractions(llama):
    _, adapter = llama
    choices = search_choices(adapter.dims(), DIVISORS, WIDTHS)
    assert choices == {"hidden_size": [24, 32, 40, 48], "ffn_hidden_size": [48, 64, 80],
                       "num_attention_heads": [4, 6],  # multiples of the 2 KV groups from 3
                       "num_layers": [2, 3, 4]}
    auto = search_choices(adapter.dims(), {}, {k: 0.6 for k in WIDTHS})  # divisors scaled down for 48 wide
    assert auto["hidden_size"] == [30, 32, 34, 36, 38, 40, 42, 44, 46, 48], auto


def test_cost_model_ranks_candidates_as_counting_pruned_models_does(llama):
    model, adapter = llama
    scores = random_unit_scores(adapter)
    space = make_space(adapter, layers_for=lambda keep: choose_layers(scores, 4, keep, "block_importance", "-")["kept"])
    sample = [space.candidate(dict(zip(space.choices, v))) for v in itertools.product(*space.choices.values())][::5]
    counted = {}
    for c in sample:
        plan = make_plan("llama", scores, adapter.dims(), c.target, depth_method="block_importance")
        assert plan.kept_layers == c.kept_layers, "the space removes the layers the plan will remove"
        counted[c.key] = real_param_count(get_adapter(model).apply(plan))
        assert counted[c.key] == c.costs["params"], (c.key, counted[c.key], c.costs["params"])
        assert c.costs["memory"] >= 2 * c.costs["params"]  # bf16 weights + the KV cache
    assert sorted(counted, key=counted.get) == sorted(counted, key=lambda k: next(
        c.costs["params"] for c in sample if c.key == k))


def test_every_kept_candidate_satisfies_every_constraint(llama):
    _, adapter = llama
    # a stand-in latency, monotone in size
    space = make_space(adapter, latency=lambda cs: [c.costs["flops"] / 1e9 for c in cs])
    profile = space.profile({"params": "70%", "flops": "80%", "memory": "75%", "latency": "85%"})
    profile.check()
    kept = space.candidates(profile.bounds)
    assert kept and set(profile.bounds) == {"params", "flops", "memory", "latency"}
    everything = [space.candidate(dict(zip(space.choices, v))) for v in itertools.product(*space.choices.values())]
    costs = [{**c.costs, "latency": c.costs["flops"] / 1e9} for c in everything]
    inside = {c.key for c, cost in zip(everything, costs) if all(cost[k] <= b for k, b in profile.bounds.items())}
    assert {c.key for c in kept} == inside, "kept must be exactly the candidates within every bound"
    for c in kept:
        assert all(c.costs[k] <= b for k, b in profile.bounds.items()), (c.key, c.costs, profile.bounds)
    use = [max(c.costs[k] / b for k, b in profile.bounds.items()) for c in kept]
    assert use == sorted(use, reverse=True), "the candidates using most of their budget come first"


def test_bad_grids_name_every_key():
    dims = {"hidden_size": 48, "ffn_hidden_size": 80, "num_attention_heads": 6, "num_query_groups": 2,
            "num_layers": 4}
    with pytest.raises(ConfigError) as err:
        search_choices(dims, {"hidden_size": 0, "num_attention_heads": 3}, {**WIDTHS, "ffn_hidden_size": 1.5})
    message = str(err.value)
    for key in ("search.divisors.hidden_size=0", "search.lowest_fraction.ffn_hidden_size=1.5",
                "search.divisors.num_attention_heads=3"):
        assert key in message, message
    with pytest.raises(ConfigError, match="only the unpruned model"):
        search_choices(dims, {}, {k: 1.0 for k in WIDTHS})
    qwen3_8b = {"hidden_size": 4096, "ffn_hidden_size": 12288, "num_attention_heads": 32, "num_query_groups": 8,
                "num_layers": 36}
    with pytest.raises(ConfigError, match=r"raise search.divisors.\* or search.lowest_fraction.\*"):
        search_choices(qwen3_8b, {"hidden_size": 1, "ffn_hidden_size": 1}, WIDTHS)


def test_bad_budgets_stop_before_any_work_with_the_range(llama):
    _, adapter = llama
    space = make_space(adapter)
    with pytest.raises(ConfigError, match=r"prune.constraints.params=1.00K is below .* spans"):
        space.profile({"params": 1000}).check()
    with pytest.raises(ConfigError, match="prune.constraints.memory='lots' is not a budget"):
        space.profile({"memory": "lots"})


def test_latency_is_measured_once_per_shape_and_cached(llama, tmp_path):
    model, adapter = llama
    space = make_space(adapter)
    c = space.candidate({"hidden_size": 32, "num_layers": 2})
    meter = LatencyMeter(model, adapter, batch_size=1, seq_len=16, repeats=2, path=tmp_path / "latency.json")
    assert meter.random_model(c).config.hidden_size == 32
    [first] = meter([c])
    assert first > 0 and meter([c, c]) == [first, first] and meter.measured == 1
    again = LatencyMeter(model, adapter, batch_size=1, seq_len=16, repeats=2, path=tmp_path / "latency.json")
    assert again([c]) == [first] and again.measured == 0, "a re-run reads the cache"
    other = LatencyMeter(model, adapter, batch_size=2, seq_len=16, repeats=2, path=tmp_path / "latency.json")
    other([c])
    assert other.measured == 1, "another input size is timed again"


def test_latency_takes_turns_and_keeps_each_shapes_fastest_run(llama, monkeypatch):
    """Shapes asked for together run in turn, so a burst of load slows one run of each, and the fastest run counts:
    a shape whose runs were all back to back would carry the burst in its median."""
    model, adapter = llama
    space = make_space(adapter)
    small, large = (space.candidate({"hidden_size": h, "num_layers": 2}) for h in (32, 48))
    meter = LatencyMeter(model, adapter, batch_size=1, seq_len=16, repeats=3, path=None)
    order, burst = [], iter([1.0, 2.0,  # warm-ups
                             9.0, 50.0,  # a burst hits round one
                             0.3, 0.5, 0.2, 0.6])
    monkeypatch.setattr(meter, "_run", lambda m, ids: order.append(m.config.hidden_size) or next(burst))
    assert meter([small, large]) == [0.2, 0.5]
    assert order == [32, 48] * 4, "one warm-up each, then the shapes in turn"
    teacher_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    groups = meter.groups([space.candidate({"hidden_size": 48})] * 5)
    assert [len(g) for g in groups] == [2, 2, 1] and all(
        sum(c.costs["params"] * 4 for c in g) <= 2 * teacher_bytes for g in groups), "twice the model's weights at most"


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert spearman([1.0], [2.0]) is None


class Killed(Exception):
    pass


def fake_scorer(calls: list, kill_after: int | None = None, offset: float = 0.0):
    """KL grows as the candidate shrinks; raises Killed after `kill_after` calls (a killed run)."""

    def score(c) -> dict:
        if kill_after is not None and len(calls) >= kill_after:
            raise Killed
        calls.append(c.key)
        kl = 1e6 / c.costs["params"] + offset + 0.01 * (hash(c.key) % 7)
        return {"kl": kl, "kl_a": kl * 0.98, "kl_b": kl * 1.02, "perplexity": 2.0 + kl}

    return score


def test_interrupted_search_resumes_without_rescoring(llama, tmp_path):
    _, adapter = llama
    space = make_space(adapter)
    candidates = space.candidates(space.profile({"params": "80%"}).bounds)
    path = tmp_path / "state.json"
    calls: list[str] = []
    with pytest.raises(Killed):
        rank(candidates, 6, 2, SearchState.load(path, "f1"), fake_scorer(calls, kill_after=4), fake_scorer(calls))
    assert len(SearchState.load(path, "f1").pruned) == 4
    resumed: list[str] = []
    result = rank(candidates, 6, 2, SearchState.load(path, "f1"), fake_scorer(resumed),
                  fake_scorer(resumed, offset=-0.5))
    assert not set(resumed[:2]) & set(calls), "the 4 scored before the kill are not scored again"
    assert result["newly_scored"] == {"pruned": 2, "distilled": 2}
    done: list[str] = []
    again = rank(candidates, 6, 2, SearchState.load(path, "f1"), fake_scorer(done), fake_scorer(done))
    assert done == [] and again["pick"].key == result["pick"].key
    assert result["pick"].key in result["finalists"] and len(result["scored"]) == 6
    assert result["noise"]["pruned"]["mean_relative_gap"] == pytest.approx(0.04)
    fresh = SearchState.load(path, "other settings")
    assert fresh.pruned == {} and (tmp_path / "state.previous.json").exists()


def test_candidate_key_is_stable():
    assert candidate_key({"num_layers": 3, "hidden_size": 40}) == "hidden_size=40,num_layers=3"


def test_nsga2_front_is_non_dominated_and_within_budget(llama, tmp_path):
    _, adapter = llama
    space = make_space(adapter, latency=lambda cs: [c.costs["flops"] / 1e9 for c in cs])
    bounds = space.profile({"params": "90%"}).bounds
    objectives = ("kl", "latency")
    scored: dict[str, float] = {}

    def kl(generation) -> list[float]:  # smaller models are worse, with a shape-dependent wobble (a non-trivial front)
        assert all(c.costs["params"] <= bounds["params"] for c in generation), "only within-budget candidates score"
        for c in generation:
            scored.setdefault(c.key, 1e6 / c.costs["params"] + 0.05 * (c.target["hidden_size"] % 16 == 0))
        return [scored[c.key] for c in generation]

    evaluated = nsga2(space, bounds, objectives, kl, population=8, generations=4, seed=0)
    assert len(evaluated) == len({c.key for c in evaluated}) > 8
    assert all(c.costs["params"] <= bounds["params"] for c in evaluated)
    front = front_of(evaluated, objectives)
    points = {c.key: [c.costs[o] for o in objectives] for c in evaluated}
    front_keys = {c.key for c in front}
    for c in front:
        assert not any(dominates(p, points[c.key]) for p in points.values()), f"{c.key} is dominated"
    for key, p in points.items():
        if key not in front_keys:
            assert any(dominates(points[f], p) for f in front_keys), f"{key} is off the front but not dominated"
    chosen = pick(front, objectives, "knee")
    assert chosen.key in front_keys
    assert pick(front, objectives, "best_under_budget").costs["kl"] == min(c.costs["kl"] for c in evaluated)
    write_csv(tmp_path / "search.csv", evaluated, front, chosen)
    plot_front(tmp_path / "front.png", evaluated, front, chosen, objectives)
    rows = (tmp_path / "search.csv").read_text().splitlines()
    assert len(rows) == len(evaluated) + 1 and "on_front" in rows[0]
    assert (tmp_path / "front.png").stat().st_size > 0

    calls: list[str] = []
    again = nsga2(space, bounds, objectives, lambda cs: [calls.append(c.key) or scored[c.key] for c in cs], 8, 4,
                  seed=0)
    assert {c.key for c in again} == set(points), "the same seed asks the same candidates (their scores are cached)"


def test_knee_is_the_corner_of_an_l_shaped_front():
    points = [[0.0, 10.0], [1.0, 1.0], [2.0, 0.8], [10.0, 0.0]]
    assert knee(points) == 1
    assert pareto_front([[1, 2], [2, 1], [2, 2], [1, 2]]) == [0, 1, 3]


TINY_SEARCH = ("prune.constraints.params=85%", "search.divisors.hidden_size=8", "search.divisors.ffn_hidden_size=16",
               "search.divisors.num_layers=1", "search.lowest_fraction.hidden_size=0.5",
               "search.lowest_fraction.ffn_hidden_size=0.5", "search.lowest_fraction.num_layers=0.5", "search.top_k=3",
               "search.finalists=2", "search.distill_tokens=64", "prune.depth.num_samples=2", "distill.max_steps=1")


def test_search_recipe_runs_end_to_end_and_resumes(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], out, *TINY_SEARCH)
    report = llmprune.run("smollm2_minitron_search", overrides)
    search = report["search"]
    assert search["scores_taken"] == 3 + 2 and len(search["scored"]) == 3
    assert report["params"]["after"] <= search["bounds"]["params"] < report["params"]["before"]
    assert {k: report["target"][k] for k in search["target"]} == search["target"]
    assert (out / "search.csv").read_text().count("\n") == 4 and (out / "search" / "state.json").is_file()
    markdown = (out / "report.md").read_text()
    assert "Architecture search" in markdown and search["pick"] in markdown
    again = llmprune.run("smollm2_minitron_search", overrides)
    assert again["search"]["scores_taken"] == 0 and again["search"]["pick"] == search["pick"]


def test_api_searches_within_constraints(llama):
    model, _ = llama
    calib = torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    pruned, plan = llmprune.prune(model, mode="minitron", constraints={"params": "85%", "memory": "90%"},
                                  calib_data=calib, batch_size=2, seq_len=16, depth_samples=2,
                                  search={"divisors": DIVISORS, "lowest_fraction": WIDTHS, "top_k": 3})
    bounds = plan.summary["search"]["bounds"]
    assert real_param_count(pruned) <= bounds["params"] and len(plan.summary["search"]["scored"]) == 3
    with pytest.raises(ConfigError, match="constraints.params=1.00K is below"):
        llmprune.prune(model, mode="minitron", constraints={"params": 1000}, calib_data=calib)


def test_api_search_takes_a_latency_budget_and_distils_the_finalists(llama):
    """prune(constraints={"latency": 10}) measures every candidate shape (10 s: timing noise never binds); search
    finalists are distilled on distill_data and re-ranked by their distilled KL; the model passed in (the teacher) is
    left as it was."""
    model, _ = llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    calib, train = torch.randint(2, 128, (4, 16), generator=g), torch.randint(2, 128, (8, 16), generator=g)
    search = {"divisors": DIVISORS, "lowest_fraction": WIDTHS, "top_k": 3, "finalists": 2, "distill_tokens": 64,
              "latency_repeats": 1, "seq_len": 16}
    pruned, plan = llmprune.prune(model, mode="minitron", constraints={"params": "85%", "latency": 10},
                                  calib_data=calib, batch_size=2, seq_len=16, depth_samples=2, search=search,
                                  distill_data=train, distill={"precision": "fp32", "lr": 1e-3})
    found = plan.summary["search"]
    assert found["latency_measured"] >= len(found["scored"]) and found["pick_costs"]["latency"] > 0
    assert found["pick_costs"]["latency"] <= found["bounds"]["latency"]
    assert real_param_count(pruned) <= found["bounds"]["params"]
    distilled = [r for r in found["scored"] if "distilled_kl" in r]
    assert len(distilled) == 2 and all(r["distilled_tokens"] == 64 for r in distilled)
    assert found["pick"] == min(distilled, key=lambda r: r["distilled_kl"])["key"], "the pick: lowest distilled KL"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the teacher was trained"
    with pytest.raises(ConfigError, match="pass distill_data="):
        llmprune.prune(model, mode="minitron", constraints={"params": "85%"}, calib_data=calib, search={"finalists": 1})
    with pytest.raises(ConfigError, match="unknown key.*objectives"):
        llmprune.prune(model, mode="minitron", constraints={"params": "85%"}, calib_data=calib,
                       search={"objectives": ["kl", "latency"]})
    with pytest.raises(ConfigError, match="distill=.*learning_rate"):
        llmprune.prune(model, mode="minitron", constraints={"params": "85%"}, calib_data=calib, search=search,
                       distill_data=train, distill={"learning_rate": 1e-3})


@pytest.mark.parametrize("overrides, messages", [
    (["search.top_k=0", "search.finalists=4", "search.objectives=[kl,speed]", "search.divisors.hidden_size=0",
      "search.lowest_fraction.num_layers=0"],
     ["search.top_k=0", "search.finalists=4", "search.objectives=['kl', 'speed']", "search.divisors.hidden_size=0",
      "search.lowest_fraction.num_layers=0"]),
    (["prune.export_config.hidden_size=448"],
     ["prune.export_config.hidden_size together with prune.constraints.params"]),
    (["prune.constraints.latency=fast"], ["prune.constraints.latency='fast' is not a budget"]),
    (["search.pick=middle"], ["search.pick='middle' is not one of"]),
])
def test_bad_search_settings_name_every_key(overrides, messages):
    with pytest.raises(ConfigError) as err:
        llmprune.load_config("smollm2_minitron_search", overrides)
    for message in messages:
        assert message in str(err.value), str(err.value)


def test_multi_objective_search_writes_the_front(tiny_model_dirs, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_run_overrides(tiny_model_dirs["llama"], out, *TINY_SEARCH, "search.objectives=[kl,latency]",
                                   "search.population=4", "search.generations=2", "search.latency_repeats=1",
                                   "prune.constraints.latency=10", "distill.max_steps=0", "eval.enabled=false")
    search = llmprune.run("smollm2_minitron_search", overrides)["search"]  # 10 s: timing noise never binds
    assert search["pick"] in search["front"] and search["latency_measured"] >= len(search["scored"])
    assert all(row["latency"] <= search["bounds"]["latency"] for row in search["scored"])
    front = (out / "search" / "front.csv").read_text().splitlines()
    assert len(front) == len(search["scored"]) + 1 and (out / "search" / "front.png").is_file()


def test_two_process_search_equals_one_process_search(tiny_model_dirs, tmp_path):
    """torchrun with 2 CPU processes (gloo): the pruned candidates are dealt out (each process scores a share, the
    rows gathered) and the finalist is distilled on both together; the same candidates, scores and pick as one
    process. Pruned scores are computed alone on the same samples, so they agree to float rounding; the distilled
    score carries DDP's summation order (test_distill.py's tolerance)."""
    extra = (*TINY_SEARCH, "search.top_k=4", "search.finalists=1", "data.eval_samples=4", "distill.precision=fp32",
             "distill.global_batch_size=2", "distill.micro_batch_size=1", "eval.enabled=false")
    one = llmprune.run("smollm2_minitron_search", tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "one",
                                                                     *extra))["search"]
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "llmprune",
               "recipe=smollm2_minitron_search", *tiny_run_overrides(tiny_model_dirs["llama"], tmp_path / "two",
                                                                     *extra)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())["search"]

    assert [r["key"] for r in two["scored"]] == [r["key"] for r in one["scored"]] and len(one["scored"]) == 4
    assert (two["pick"], two["finalists"]) == (one["pick"], one["finalists"])
    for a, b in zip(one["scored"], two["scored"]):
        for k in ("pruned_kl", "pruned_kl_a", "pruned_kl_b", "pruned_perplexity"):
            assert b[k] == pytest.approx(a[k], rel=1e-6), (a["key"], k, a[k], b[k])
        if "distilled_kl" in a:
            assert b["distilled_kl"] == pytest.approx(a["distilled_kl"], rel=1e-4), (a["key"], a, b)
    assert sorted(r["pruned_process"] for r in two["scored"]) == [0, 0, 1, 1], "each process scores its share"
    assert {r["pruned_process"] for r in one["scored"]} == {0}
    assert two["newly_scored"] == one["newly_scored"] == {"pruned": 4, "distilled": 1}
    state_1, state_2 = (json.loads((tmp_path / d / "search" / "state.json").read_text()) for d in ("one", "two"))
    assert state_1["pruned"].keys() == state_2["pruned"].keys(), "rank zero saved every process's scores"


def test_heldout_teacher_runs_once_per_batch_and_scores_bit_for_bit(llama):
    from llmprune.data import to_batches
    from llmprune.evaluate import evaluate
    from llmprune.search.stage import HeldoutTeacher

    model, adapter = llama
    student = get_adapter(model).apply(make_plan("llama", random_unit_scores(adapter), adapter.dims(),
                                                 {"hidden_size": 32}))
    batches = to_batches(torch.randint(2, 128, (4, 16), generator=torch.Generator().manual_seed(0)), 2)
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        cached = HeldoutTeacher(model)
        first, second = (evaluate(student, batches, teacher=cached) for _ in range(2))
        assert len(calls) == len(batches), "the teacher runs once per held-out batch, not once per candidate"
        live = evaluate(student, batches, teacher=model)
    finally:
        handle.remove()
    assert first == second == live
