"""The CPU memory allocator the command runs with, and what training asks of it.

A CPU training step allocates and frees its activations and temporaries (~1 GB for the SmolLM2 student at 4 x 256
tokens) every step. Two things cost there: handing freed memory back to the OS, which makes the next step fault every
page in again (~2 s per GB on a 2-core virtual machine), and fragmentation, freed blocks that later requests of other
sizes cannot use. glibc's malloc, told to keep what is freed (`keep_freed_memory`), grows its heap ~0.3 GiB past the
bytes in use by the end of each forward (measured in the default recipe: heap 2.09 GiB with 1.74 GiB in use), because
the temporaries a layer frees leave holes its next, differently sized, tensors do not fit. jemalloc serves each size
class from its own runs: the default recipe's steps peak at 2.86 GiB instead of 2.97-3.02 and run 4.8% faster, with
the same losses (bench/results/allocator.md, float32). But jemalloc joins adjacent freed extents only when it gives
them back, so memory kept free splits into ever smaller pieces that large requests do not fit: under bf16 autocast,
whose tensors come in more sizes, the default recipe's resident memory grew 0.35 GiB a step (4.9 GiB after 8 steps).
Training therefore gives the free memory back twice a step, when backward reaches the input embedding (the
activations are free, the embedding's large gradient is next) and after the step (`llmprune.distill.train`): the
steps still reuse what they free within them, and the peak stays bounded (bench/results/release_every_step_*.md,
release_at_embedding_*.md).

`python -m llmprune` runs itself again with jemalloc preloaded where the library is installed
(`apt install libjemalloc2`; `use_jemalloc`): LLMPRUNE_ALLOCATOR=auto (that), jemalloc (required: an error where
it is missing) or system (glibc's malloc as it is). LLMPRUNE_JEMALLOC names the library file where it is not in a
standard place. The allocator changes where tensors live, not what is computed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

ENV, LIBRARY_ENV, _PRELOADED_ENV = "LLMPRUNE_ALLOCATOR", "LLMPRUNE_JEMALLOC", "LLMPRUNE_JEMALLOC_PRELOADED"
CHOICES = ("auto", "jemalloc", "system")
MALLCTL_ARENAS_ALL = 4096  # jemalloc's arena index meaning every arena


def find_jemalloc() -> str | None:
    """The jemalloc shared library's path: $LLMPRUNE_JEMALLOC, else the first in this Python's and the system's
    library folders; None where there is none (or off Linux, where LD_PRELOAD does not apply)."""
    if os.environ.get(LIBRARY_ENV):
        return os.environ[LIBRARY_ENV]
    if not sys.platform.startswith("linux"):
        return None
    folders = [Path(sys.prefix) / "lib", Path("/usr/local/lib"), Path(f"/usr/lib/{platform.machine()}-linux-gnu"),
               Path("/usr/lib64"), Path("/usr/lib")]
    return next((str(f / name) for f in folders for name in ("libjemalloc.so.2", "libjemalloc.so")
                 if (f / name).is_file()), None)


def _mallctl():
    """jemalloc's control function where jemalloc is this process's malloc, else None."""
    try:
        return ctypes.CDLL(None).mallctl
    except AttributeError:
        return None


def jemalloc_loaded() -> bool:
    return _mallctl() is not None


def use_jemalloc() -> None:
    """Run this command again with jemalloc preloaded, per LLMPRUNE_ALLOCATOR (see above). Call it before anything
    else: the process is replaced (same PID, so torchrun keeps track of its workers) by the same command line."""
    choice = os.environ.get(ENV, "auto")
    if choice not in CHOICES:
        raise SystemExit(f"error: {ENV}={choice!r}; use one of {', '.join(CHOICES)}.")
    if choice == "system" or jemalloc_loaded():
        return
    library = find_jemalloc()
    if library is None or not Path(library).is_file():
        if choice == "jemalloc":
            where = f"{LIBRARY_ENV}={library}: no such file" if library else "no libjemalloc found"
            raise SystemExit(f"error: {ENV}=jemalloc but {where}; install it (apt install libjemalloc2), point "
                             f"{LIBRARY_ENV} at libjemalloc.so.2, or set {ENV}=system.")
        return
    if os.environ.get(_PRELOADED_ENV):  # preloaded once and still absent (a static interpreter): go on without it
        return
    preload = " ".join(p for p in (library, os.environ.get("LD_PRELOAD")) if p)
    env = {**os.environ, "LD_PRELOAD": preload, _PRELOADED_ENV: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _set_decay(mallctl, milliseconds: int) -> None:
    """Every arena's (and every later arena's) time before freed pages go back to the OS; -1: never."""
    value = ctypes.c_ssize_t(milliseconds)
    count, size = ctypes.c_uint(0), ctypes.c_size_t(ctypes.sizeof(ctypes.c_uint))
    mallctl(b"arenas.narenas", ctypes.byref(count), ctypes.byref(size), None, ctypes.c_size_t(0))
    for kind in ("dirty", "muzzy"):
        mallctl(f"arenas.{kind}_decay_ms".encode(), None, None, ctypes.byref(value), ctypes.sizeof(value))
        for arena in range(count.value):  # arenas no thread has used yet answer with an error: nothing to set
            mallctl(f"arena.{arena}.{kind}_decay_ms".encode(), None, None, ctypes.byref(value), ctypes.sizeof(value))


def keep_freed_memory() -> str | None:
    """Keep freed CPU memory in the process for the next allocation instead of faulting it in again every step;
    the process's resident size stays at the peak of the steps (`release_freed_memory` gives it back after them).
    Returns the allocator it applied to (None where it cannot: not glibc or jemalloc)."""
    mallctl = _mallctl()
    if mallctl is not None:
        _set_decay(mallctl, -1)
        return "jemalloc"
    return "glibc" if _glibc_keep_freed() else None


@lru_cache(maxsize=1)
def _glibc_keep_freed() -> bool:
    """glibc: no block from mmap (each freed one above 32 MB would go back to the OS) and no trimming of the heap."""
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from glibc's malloc.h
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its defaults
        return False


def release_freed_memory() -> None:
    """Give the allocator's free memory back to the OS (jemalloc: purge every arena; glibc: malloc_trim)."""
    mallctl = _mallctl()
    if mallctl is not None:
        mallctl(f"arena.{MALLCTL_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
