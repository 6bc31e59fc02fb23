"""Reading and writing safetensors files, one tensor slice at a time.

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
row-major bytes. We read through a memory map, so a slice of a tensor costs the pages it
touches, never the whole file; and we write tensor by tensor from a producer, so an export never
holds the whole model on the host. (safetensors' own numpy backend cannot represent bfloat16, the
dtype most checkpoints are stored in; `ml_dtypes`, which JAX ships, can.)
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _read_header(path: pathlib.Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header length {n} bytes)")
        text = f.read(n)
    if len(text) < n:
        raise ValueError(f"{path} is truncated: its header is {n:,} bytes long but the file ends after "
                         f"{len(text):,} of them")
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file (its header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is a {type(header).__name__}, not an object)")
    return header, 8 + n


def _check_extents(path: pathlib.Path, header: dict, data_start: int) -> None:
    """Every tensor's bytes match its shape and dtype and lie inside the file (a cut download
    otherwise fails later as `cannot reshape array of size 0`)."""
    spans = []
    for key, e in header.items():
        begin, end = e["data_offsets"]
        need = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
        if not 0 <= begin <= end or end - begin != need:
            raise ValueError(f"{path}: tensor {key!r} ({e['dtype']} {list(e['shape'])}) needs {need:,} bytes but "
                             f"its data_offsets [{begin}, {end}] hold {end - begin:,}: the header is corrupt")
        spans.append((end, begin, key))
    size = path.stat().st_size
    expected = data_start + max((end for end, _, _ in spans), default=0)
    if size < expected:
        cut = sorted((begin, end, key) for end, begin, key in spans if data_start + end > size)
        begin, end, key = cut[0]
        more = f", and {len(cut) - 1} tensor{'s' if len(cut) > 2 else ''} after it" if len(cut) > 1 else ""
        raise ValueError(f"{path} is truncated: expected {expected:,} bytes, found {size:,}; tensor {key!r} "
                         f"(data bytes {begin:,}-{end:,}) is cut off{more}")


class SafetensorsReader:
    """Every tensor of a Hugging Face model directory: `model.safetensors`, or the shards listed in
    `model.safetensors.index.json`, or any `*.safetensors` files there; or of one file.

    `read(name, index)` returns a numpy copy of `tensor[index]` (a tuple of slices), touching only
    the rows the slice needs.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        index = self.directory / INDEX_FILE
        if self.directory.is_file():  # one file (a PEFT adapter's adapter_model.safetensors)
            self.directory, files = self.directory.parent, [self.directory.name]
        elif index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in self.directory.iterdir()) if self.directory.is_dir() else []
            hint = " (PyTorch .bin weights: re-save them with safe_serialization=True)" if any(
                f.endswith(".bin") for f in found) else ""
            raise FileNotFoundError(f"no safetensors weights in {self.directory}{hint}; found {found}")
        self._entries: dict[str, tuple[pathlib.Path, np.dtype, tuple[int, ...], int]] = {}
        self._maps: dict[pathlib.Path, np.memmap] = {}
        for name in files:
            path = self.directory / name
            header, data_start = _read_header(path)
            header.pop("__metadata__", None)
            for key, e in header.items():
                if e["dtype"] not in DTYPES:
                    raise ValueError(f"{path}: tensor {key!r} has dtype {e['dtype']}; readable: {sorted(DTYPES)}")
            _check_extents(path, header, data_start)
            for key, e in header.items():
                begin, _ = e["data_offsets"]
                self._entries[key] = (path, DTYPES[e["dtype"]], tuple(e["shape"]), data_start + begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][1]

    def _view(self, name: str) -> np.ndarray:
        path, dtype, shape, offset = self._entries[name]
        if path not in self._maps:
            self._maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape, dtype=np.int64))
        flat = self._maps[path][offset:offset + count * dtype.itemsize].view(dtype)
        return flat.reshape(shape)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """A copy of `tensor[index]`; only the pages under the slice are read from disk."""
        view = self._view(name)
        return np.array(view if index is None else view[index])

    def close(self):
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(directory: str | os.PathLike,
                      tensors: Sequence[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]], *,
                      max_shard_bytes: int = 5 * 2**30, metadata: dict[str, str] | None = None,
                      single_file: str = SINGLE_FILE) -> list[str]:
    """Writes `(name, shape, dtype, produce)` tensors as Hugging Face does: one `single_file` (default
    `model.safetensors`; a PEFT adapter's is `adapter_model.safetensors`),
    or `model-0000i-of-0000n.safetensors` shards of at most `max_shard_bytes` (a larger tensor gets
    a shard of its own) plus `model.safetensors.index.json`. Each `produce()` is called once, when
    its bytes are written, so at most one tensor is in host memory. Returns the files written."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1], dtype=np.int64)) * np.dtype(t[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    names = ([single_file] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for name, shape, dtype, _ in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        tmp = directory / (fname + ".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape, dtype, produce in shard:
                arr = np.ascontiguousarray(produce(), dtype=dtype)
                if arr.shape != tuple(shape):
                    raise ValueError(f"tensor {name!r}: produced shape {arr.shape}, declared {tuple(shape)}")
                f.write(arr.tobytes())
        os.replace(tmp, directory / fname)
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    elif single_file == SINGLE_FILE and (directory / INDEX_FILE).exists():
        (directory / INDEX_FILE).unlink()  # a stale index would point at shards we did not write
    return names


def dtype_name(dtype) -> str:
    """numpy/JAX dtype -> the name our configs use ("bfloat16", "float32", "float16")."""
    return np.dtype(dtype).name


def tensors_in(files: Iterable[str | os.PathLike]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) over safetensors files (a test and debugging helper)."""
    out = {}
    for path in files:
        header, _ = _read_header(pathlib.Path(path))
        header.pop("__metadata__", None)
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()})
    return out
