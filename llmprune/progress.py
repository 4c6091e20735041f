"""Progress bars and console output from rank zero only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

from tqdm.auto import tqdm

from llmprune.distributed import is_rank_zero

log = logging.getLogger("llmprune")


def progress(iterable: Iterable, total: int | None = None, desc: str = "") -> Iterable:
    """A tqdm bar on rank zero (to stderr), the bare iterable elsewhere."""
    if not is_rank_zero():
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def setup_logging(level: int = logging.INFO) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[llmprune] %(message)s"))
        log.addHandler(handler)
    log.setLevel(level if is_rank_zero() else logging.WARNING)
    log.propagate = False
    if not is_rank_zero():  # transformers' own bars ("Loading weights") too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
