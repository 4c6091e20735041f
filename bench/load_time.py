"""Usage: python bench/load_time.py [--rounds 2]

Loading the embedded SmolLM2-135M GGUF (`llmprune.models.load_model("embedded:smollm2")`) straight from the GGUF file
(LLMPRUNE_CACHE=off: transformers parses the GGUF metadata for the config, the tokenizer and the weights) against
loading the converted copy llmprune keeps (`converted_gguf`), each in a fresh process so nothing is warm in Python;
the first converted load writes the copy and is timed as well. Also `python -m llmprune --list-recipes`, which no
longer imports torch. Rounds alternate the ways, so a change of load hits each.
Writes bench/results/load_time.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, write_results  # noqa: E402

LOAD = ("import time; t = time.perf_counter(); from llmprune.models import load_model; "
        "load_model('embedded:smollm2', device='cpu'); print(time.perf_counter() - t)")


def seconds(code: str | None, cache: str, args: tuple[str, ...] = ()) -> float:
    """Wall seconds inside a fresh process (`code`'s own clock), or of the whole `python -m llmprune args` command."""
    env = {**os.environ, "LLMPRUNE_CACHE": cache}
    if code is None:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmprune", *args], env=env, check=True, capture_output=True)
        return time.perf_counter() - start
    done = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        first = seconds(LOAD, cache)  # converts and keeps the copy
        runs: dict[str, list[float]] = {"gguf": [], "copy": [], "list": []}
        for _ in range(args.rounds):
            runs["gguf"].append(seconds(LOAD, "off"))
            runs["copy"].append(seconds(LOAD, cache))
            runs["list"].append(seconds(None, cache, ("--list-recipes",)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    rows = [["from the GGUF file (LLMPRUNE_CACHE=off)", med["gguf"], runs["gguf"]],
            ["first load with the cache (converts, writes the copy)", first, [round(first, 2)]],
            ["from the kept copy", med["copy"], runs["copy"]],
            ["`python -m llmprune --list-recipes` (whole command)", med["list"], runs["list"]]]
    markdown = "\n".join([
        "## Loading the embedded SmolLM2-135M (GGUF Q4_1), fresh process each, this CPU", "",
        md_table(["load", "median s", "runs (s)"], [[n, m, ", ".join(f"{x:.2f}" for x in r)] for n, m, r in rows]),
        "", f"The kept copy loads {med['gguf'] / med['copy']:.0f}x faster than the GGUF file."])
    write_results("load_time", markdown, {"runs_s": runs, "first_with_cache_s": first, "median_s": med})


if __name__ == "__main__":
    main()
