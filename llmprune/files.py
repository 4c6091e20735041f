"""Reading the files a run depends on (model weights, data, run-directory artifacts) and making the run directory.

Every reader here turns a parser's exception into an InputFileError that names the file and says what to do
(re-download it, delete it, fix the line), so a damaged input stops the run with a message instead of a traceback.
Nothing here unpickles: torch files are read with weights_only=True.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

from llmprune.errors import InputFileError

if TYPE_CHECKING:  # torch is imported where a tensor is read: config validation reads JSON only
    import torch


MODEL_FIX = "download or export the model again (the file is damaged; its size should match the source's)"


def _problem(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".strip()


def safetensors_metadata(path: Path, fix: str) -> dict[str, str]:
    """The header metadata of a safetensors file, after checking that the header parses and that its tensors cover
    the file exactly (what a truncated or overwritten file fails)."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as err:  # SafetensorError, OSError: a parser's message without the file's name
        raise InputFileError(f"{path} is truncated or corrupt ({_problem(err)}); {fix}") from err


def load_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (see safetensors_metadata for what is checked)."""
    safetensors_metadata(path, fix)
    try:
        with safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as err:
        raise InputFileError(f"{path} is truncated or corrupt ({_problem(err)}); {fix}") from err


def load_torch(path: Path, fix: str):
    """A torch.save file of tensors and plain values, read with weights_only=True (no code is unpickled)."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # RuntimeError (zip), EOFError, UnpicklingError (not weights-only), OSError
        raise InputFileError(f"{path} is missing, truncated or corrupt ({_problem(err)}); {fix}") from err


def read_json(path: Path, fix: str):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputFileError(f"{path} is missing or not valid JSON ({_problem(err)}); {fix}") from err


def read_utf8(path: Path, fix: str) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); other bytes are an error naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputFileError(
            f"{path}: line {line} is not UTF-8 text (byte {err.start}: "
            f"{data[err.start : err.end]!r}, {err.reason}); {fix}"
        ) from err


# -- GGUF: bounds of every tensor against the file's size, without reading the data --------------------------------
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buffer, order: str):
        self.buffer, self.order, self.at = buffer, order, 0

    def read(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buffer):
            raise EOFError(f"the header ends at byte {len(self.buffer)}, inside an entry at byte {self.at}")
        (value,) = struct.unpack_from(self.order + fmt, self.buffer, self.at)
        self.at += size
        return value

    def string(self) -> bytes:
        n = self.read("Q")
        if self.at + n > len(self.buffer):
            raise EOFError(f"a string of {n} bytes at byte {self.at} runs past the end of the file")
        self.at += n
        return bytes(self.buffer[self.at - n : self.at])

    def skip_value(self, kind: int):
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.read("I"), self.read("Q")
            if item in _SCALARS:  # a vocabulary's scores / token types: skip in one step
                self.at += count * struct.calcsize(_SCALARS[item])
                return None
            for _ in range(count):
                self.skip_value(item)
            return None
        if kind not in _SCALARS:
            raise ValueError(f"unknown value type {kind} at byte {self.at}")
        return self.read(_SCALARS[kind])


def _gguf_extent(buffer) -> tuple[int, int]:
    """(bytes the header and every tensor need, tensor count) of a GGUF v2/v3 file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if bytes(buffer[:4]) != b"GGUF":
        raise ValueError(f"it does not start with the GGUF magic (starts with {bytes(buffer[:4])!r})")
    order = "<" if struct.unpack_from("<I", buffer, 4)[0] in (2, 3) else ">"
    cursor = _Cursor(buffer, order)
    cursor.at = 4
    version = cursor.read("I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; versions 2 and 3 are read")
    n_tensors, n_fields = cursor.read("Q"), cursor.read("Q")
    alignment = 32
    for _ in range(n_fields):
        key = cursor.string()
        value = cursor.skip_value(cursor.read("I"))
        if key == b"general.alignment":
            alignment = int(value)
    end = 0
    for _ in range(n_tensors):
        name = cursor.string().decode("utf-8", "replace")
        shape = [cursor.read("Q") for _ in range(cursor.read("I"))]
        kind, offset = cursor.read("I"), cursor.read("Q")
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        count = 1
        for n in shape:
            count *= n
        end = max(end, offset + count // block * block_bytes)
        if count % block:
            raise ValueError(f"tensor {name}: {count} values are not whole blocks of {block}")
    data_start = -(-cursor.at // alignment) * alignment
    return data_start + end, n_tensors


def check_gguf(path: Path, fix: str) -> None:
    """Check that a GGUF file's header parses and that every tensor it lists lies inside the file (a truncated
    download fails this); the data itself is not read."""
    size = Path(path).stat().st_size
    try:
        if size == 0:
            raise EOFError("the file is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            needed, n_tensors = _gguf_extent(buffer)
    except (EOFError, ValueError, KeyError, struct.error) as err:
        raise InputFileError(f"{path} is truncated or corrupt ({_problem(err)}); {fix}") from err
    if needed > size:
        raise InputFileError(
            f"{path} is truncated: its {n_tensors} tensors need {needed:,} bytes but the file has {size:,}; {fix}"
        )


# -- the run directory ----------------------------------------------------------------------------------------------
def make_output_dir(path: Path, key: str = "output_dir") -> None:
    """Create the run directory (and its parents) and check that files can be written in it."""
    path = Path(path)
    fix = f"set {key}=<a writable directory> (e.g. {key}=outputs/my_run)"
    if path.exists() and not path.is_dir():
        raise InputFileError(f"{key}={path} is a file, not a directory; {fix}, or move the file away.")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a read-only mount or directory fails here, not stages later
            pass
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
        raise InputFileError(
            f"{key}={path} cannot be created or written: {err.strerror or err}{where}; {fix}."
        ) from err
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputFileError(f"{key}={path} is not writable; {fix}.")
