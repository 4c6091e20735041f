"""Text for calibration and held-out evaluation: sources, tokenization, packing and the held-out split.

Documents are de-duplicated (exact repeats; for the embedded text also repeated passages, so no passage sits on
both sides of the held-out cut), tokenized, joined with EOS into one stream and cut into packed samples of
`seq_len` tokens, so no padding is needed. The stream's tail (`eval_fraction`) is the held-out region: calibration
(and later distillation) draws only from the head, evaluation only from the tail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from llmprune.errors import ConfigError, CorpusUnreachable, InputFileError
from llmprune.files import read_utf8
from llmprune.progress import log


@dataclass
class Batch:
    """input_ids (B, S); attention_mask (B, S) with 0 on padding, or None when every token is real."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None


@dataclass
class TextSplits:
    calib: torch.Tensor  # (N, S) packed calibration samples
    heldout: torch.Tensor  # (M, S) packed held-out samples, disjoint from calib and train
    train: torch.Tensor  # (T, S) every window of the head: distillation data (calib is a subset)
    stream_tokens: int
    calib_region_tokens: int


def embedded_documents() -> list[str]:
    """Python's pydoc topics (ships with CPython; 92K SmolLM2 tokens), in a fixed order, each repeated passage kept
    only where it first appears (see dedupe_passages: 113K tokens before)."""
    from pydoc_data.topics import topics

    return dedupe_passages([topics[key] for key in sorted(topics)])


# Shorter paragraphs are headings and boilerplate ("Note:", "New in version 3.10.", "object.__len__(self)"). At 32
# no 128-character run of the held-out tail is also in the head; at 64, runs of repeated list items still were.
MIN_PASSAGE_CHARS = 32


def dedupe_passages(docs: list[str], min_chars: int = MIN_PASSAGE_CHARS) -> list[str]:
    """Drop every paragraph of at least `min_chars` characters that appeared earlier (in this or an earlier document).

    The pydoc topics repeat whole passages across topics (about a fifth of the text): a passage in both the
    calibration / training head and the held-out tail would let evaluation measure memorization. Documents left
    empty are dropped.
    """
    seen: set[str] = set()
    out, dropped = [], 0
    for doc in docs:
        kept = []
        for paragraph in doc.split("\n\n"):
            key = " ".join(paragraph.split())
            if len(key) >= min_chars:
                if key in seen:
                    dropped += 1
                    continue
                seen.add(key)
            kept.append(paragraph)
        if any(p.strip() for p in kept):
            out.append("\n\n".join(kept))
    if dropped:
        log.info(f"data: dropped {dropped} repeated passages (paragraphs of {min_chars}+ characters seen before)")
    return out


def _read_file(path: Path, text_field: str) -> list[str]:
    fix = ("convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8 in.txt > out.txt) or remove it from data.paths")
    content = read_utf8(path, fix)
    if path.suffix != ".jsonl":
        return [content]
    docs = []
    for n, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputFileError(f"{path}:{n}: line {n} is not a JSON object ({err.msg}, column {err.colno}); each "
                                 "line of a .jsonl file is one JSON object: fix or delete the line, or remove the "
                                 "file from data.paths.") from err
        if not isinstance(row, dict):
            raise InputFileError(f"{path}:{n}: line {n} is a JSON {type(row).__name__}, not an object with a "
                                 f"'{text_field}' key; fix or delete the line.")
        if text_field not in row:
            raise ConfigError(f"{path}:{n} has no key '{text_field}'; set data.text_field=<key> "
                              f"(keys here: {', '.join(row)}).")
        docs.append(str(row[text_field]))
    return docs


def load_documents(source: str, paths=(), dataset: str | None = None, dataset_config: str | None = None,
                   split: str = "train", text_field: str = "text", max_documents: int = 20000, mix=(),
                   render_chat: Callable[[list[dict]], str] | None = None) -> list[str]:
    """Documents from `source`: embedded | files | hf (see DataConfig). Exact repeats of a document are dropped
    (the embedded text also loses its repeated passages).

    source=hf reads `dataset`, or with `mix` several datasets ({dataset, config, split, text_field, weight} each),
    `max_documents` shared by weight and interleaved so that every part of the stream (calibration head, held-out
    tail) holds each in proportion. A conversation (a list of {role, content} messages in the text field) becomes
    `render_chat(messages)` (the tokenizer's chat template) or, without it, its contents joined by blank lines.
    Raises CorpusUnreachable when a dataset cannot be read."""
    if source == "embedded":
        return embedded_documents()
    if source == "files":
        docs = []
        for p in paths:
            path = Path(p)
            if not path.exists():
                raise ConfigError(f"data.paths: '{p}' does not exist.")
            files = sorted(f for f in path.rglob("*") if f.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
            for f in files:
                docs += _read_file(f, text_field)
        return unique(docs)
    if source == "hf":
        parts = list(mix) or [{"dataset": dataset, "config": dataset_config, "split": split, "text_field": text_field,
                               "weight": 1.0}]
        total = sum(part["weight"] for part in parts)
        loaded = []
        for part in parts:
            quota = max(1, round(max_documents * part["weight"] / total))
            rows = _hf_documents(part["dataset"], part.get("config"), part.get("split", "train"),
                                 part.get("text_field", "text"), quota)
            loaded.append([as_text(row, render_chat) for row in rows])
        return unique(interleave(loaded))
    raise ConfigError(f"Unknown data.source '{source}'. Known: embedded, files, hf.")


def as_text(value, render_chat: Callable[[list[dict]], str] | None = None) -> str:
    """A row's text: a string as it is; a conversation (list of {role, content}) through the chat template when
    one is given, else its contents joined by blank lines."""
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return render_chat(value) if render_chat else "\n\n".join(str(m["content"]) for m in value)
    return str(value)


def interleave(parts: list[list[str]]) -> list[str]:
    """The documents of every part merged so each part is spread evenly over the result (document i of a part of
    n sits at fraction (i + 0.5) / n), in a fixed order."""
    keyed = [((i + 0.5) / len(docs), k, doc) for k, docs in enumerate(parts) for i, doc in enumerate(docs)]
    return [doc for *_, doc in sorted(keyed, key=lambda t: (t[0], t[1]))]


def unique(docs: list[str]) -> list[str]:
    """The documents in order, each exact repeat dropped (a repeat on both sides of the held-out cut leaks it)."""
    out = list(dict.fromkeys(docs))
    if len(out) < len(docs):
        log.info(f"data: dropped {len(docs) - len(out)} repeated documents")
    return out


def _hf_documents(dataset: str | None, dataset_config: str | None, split: str, text_field: str,
                  max_documents: int) -> list[str]:
    import datasets

    fix = ("Without network use data.source=files data.paths=[...] or data.source=embedded (or, where there is "
           "network, write the dataset as .jsonl files with Dataset.to_json and use data.source=files).")
    docs = []
    try:  # streaming: loading only resolves the files, the rows (and most network errors) come while iterating
        for row in datasets.load_dataset(dataset, dataset_config, split=split, streaming=True):
            if text_field not in row:
                raise ConfigError(f"data.text_field='{text_field}' is not a column of {dataset}: {', '.join(row)}.")
            docs.append(row[text_field])
            if len(docs) >= max_documents:
                break
    except ConfigError:
        raise
    except Exception as err:  # network, missing name, missing cache, offline mode: say which key to change
        raise CorpusUnreachable(f"data.dataset='{dataset}' (data.source=hf) could not be loaded "
                                f"({type(err).__name__}: {err}). {fix}") from err
    return docs


def token_stream(docs: list[str], tokenizer) -> torch.Tensor:
    """All documents tokenized and joined by EOS into one 1-D LongTensor."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        if doc.strip():
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
            if sep is not None:
                ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def split_stream(stream: torch.Tensor, seq_len: int, num_samples: int, eval_samples: int, eval_fraction: float,
                 seed: int = 0) -> TextSplits:
    """Packed calibration samples (random windows of the head) and held-out samples (the tail)."""
    cut = int(len(stream) * (1 - eval_fraction))
    head, tail = stream[:cut], stream[cut:]
    n_head, n_tail = len(head) // seq_len, len(tail) // seq_len
    if n_head < num_samples:
        raise ConfigError(f"data.num_samples={num_samples} needs {num_samples * seq_len} calibration tokens but the "
                          f"text gives {len(head)} (seq_len={seq_len}); lower data.num_samples or data.seq_len, "
                          "or add text.")
    if n_tail < 1:
        raise ConfigError(f"The held-out tail has {len(tail)} tokens, less than data.seq_len={seq_len}; raise "
                          "data.eval_fraction or add text.")
    windows = head[: n_head * seq_len].view(n_head, seq_len)
    order = torch.randperm(n_head, generator=torch.Generator().manual_seed(seed))[:num_samples]
    heldout = tail[: n_tail * seq_len].view(n_tail, seq_len)[:eval_samples]
    if len(heldout) < eval_samples:
        log.warning(f"data.eval_samples={eval_samples} but the held-out tail holds {len(heldout)} samples of "
                    f"{seq_len} tokens; evaluating on {len(heldout)} (raise data.eval_fraction or add text).")
    return TextSplits(calib=windows[order.sort().values], heldout=heldout, train=windows, stream_tokens=len(stream),
                      calib_region_tokens=cut)


def to_batches(ids: torch.Tensor, batch_size: int, attention_mask: torch.Tensor | None = None) -> list[Batch]:
    return [Batch(ids[i: i + batch_size], None if attention_mask is None else attention_mask[i: i + batch_size])
            for i in range(0, len(ids), batch_size)]


def as_batches(calib_data, tokenizer=None, seq_len: int = 256, batch_size: int = 4) -> list[Batch]:
    """Normalize the Python API's `calib_data` into batches.

    Accepts a LongTensor (N, S) of token ids; a list of strings (needs `tokenizer`; packed into seq_len windows);
    or an iterable of dicts / Batch objects with `input_ids` and optional `attention_mask`.
    """
    if isinstance(calib_data, torch.Tensor):
        if calib_data.dim() != 2:
            raise ValueError(f"calib_data must be (num_samples, seq_len) token ids, got {tuple(calib_data.shape)}")
        return to_batches(calib_data.long(), batch_size)
    items = list(calib_data)
    if items and isinstance(items[0], str):
        if tokenizer is None:
            raise ValueError("calib_data is a list of strings: pass tokenizer=... to prune().")
        stream = token_stream(items, tokenizer)
        n = len(stream) // seq_len
        if n == 0:
            raise ValueError(f"calib_data has {len(stream)} tokens, fewer than seq_len={seq_len}.")
        return to_batches(stream[: n * seq_len].view(n, seq_len), batch_size)
    out = []
    for item in items:
        if isinstance(item, Batch):
            out.append(item)
        else:
            out.append(Batch(item["input_ids"], item.get("attention_mask")))
    if not out:
        raise ValueError("calib_data is empty.")
    return out
