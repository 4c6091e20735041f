"""The resumable search state: every scored candidate and distilled finalist, in `search/state.json`.

It is written (atomically, by rank zero) after every score, so a killed search started again with the same command
re-scores nothing it already has. A state made under another fingerprint (other scores, data, grids or budgets) is
set aside as state.previous.json and the search starts over.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from llmprune.distributed import is_rank_zero

log = logging.getLogger("llmprune")


@dataclass
class SearchState:
    """Scores by candidate key.

    Attributes:
        path: the JSON file (None: kept in memory only, as the Python API does).
        fingerprint: what the scores depend on.
        pruned: key -> {kl, kl_a, kl_b, perplexity} after pruning (held-out halves a and b).
        distilled: key -> the same after the short distillation.
    """

    path: Path | None
    fingerprint: str
    pruned: dict[str, dict] = field(default_factory=dict)
    distilled: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> SearchState:
        """The state at `path` when it has `fingerprint`, else an empty one (the old file set aside)."""
        try:
            data = json.loads(path.read_text()) if path is not None else None
        except FileNotFoundError:  # none yet, or rank zero just set another fingerprint's state aside
            data = None
        if data is None:
            return cls(path, fingerprint)
        if data.get("fingerprint") != fingerprint:
            if is_rank_zero():
                path.replace(path.with_name("state.previous.json"))
            log.warning(f"search: {path} came from other settings; starting over (old state: state.previous.json)")
            return cls(path, fingerprint)
        log.info(f"search: resuming with {len(data['pruned'])} scored candidates and {len(data['distilled'])} "
                 "distilled finalists")
        return cls(path, fingerprint, data["pruned"], data["distilled"])

    def save(self) -> None:
        if self.path is None or not is_rank_zero():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "pruned": self.pruned,
                                   "distilled": self.distilled}, indent=1))
        tmp.replace(self.path)
