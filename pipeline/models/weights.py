"""Safetensors weight files read and written a piece at a time, so no process ever holds a whole model.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw data. `WeightFiles` reads any range of elements of a
tensor with one seek and one read (a ZeRO-3 rank reads only its own partition). `ShardWriter` writes
tensors into numbered shards of bounded size plus the `model.safetensors.index.json` that
`from_pretrained` reads, holding at most one shard in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class StoredTensor:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset of element 0 in the file

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


class WeightFiles:
    """Every tensor of a HF directory's *.safetensors files, by name, readable in element ranges."""

    def __init__(self, directory: str | Path):
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
        self.tensors: dict[str, StoredTensor] = {}
        for file in files:
            with open(file, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
            for name, entry in header.items():
                if name != "__metadata__":
                    self.tensors[name] = StoredTensor(file, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                                      8 + length + entry["data_offsets"][0])

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `name`, as a new 1-D tensor of its stored dtype."""
        stored = self.tensors[name]
        stop = stored.numel if stop is None else stop
        out = torch.empty(max(0, stop - start), dtype=stored.dtype)
        with open(stored.file, "rb") as handle:
            handle.seek(stored.begin + start * out.element_size())
            handle.readinto(memoryview(out.view(torch.uint8).numpy()))
        return out


class ShardWriter:
    """Writes tensors one at a time into `model-NNNNN.safetensors` shards of at most `max_bytes`
    each (a bigger tensor gets a shard of its own). `close` renames the shards to HF's
    `model-NNNNN-of-MMMMM` names and writes the index, which `from_pretrained` reads (a model that
    fits one shard is `model.safetensors`, as save_pretrained names it)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.written: list[Path] = []
        self.weight_map: dict[str, int] = {}
        self.pending: list[tuple[str, torch.Tensor]] = []
        self.pending_bytes = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending.append((name, tensor.detach().contiguous()))
        self.pending_bytes += nbytes

    def _flush(self) -> None:
        """The pending tensors as one safetensors file, each written straight from its own memory
        (safetensors' save_file would first build the whole file in memory: a second shard)."""
        path = self.directory / f"model-{len(self.written) + 1:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, tensor in self.pending:
            nbytes = tensor.numel() * tensor.element_size()
            header[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            for _, tensor in self.pending:
                out.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        for name, _ in self.pending:
            self.weight_map[name] = len(self.written)
        self.written.append(path)
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = [], 0

    def close(self) -> list[Path]:
        if self.pending:
            self._flush()
        count = len(self.written)
        if count == 1:  # one file: HF's name for an unsharded model, and no index
            single = self.written[0].rename(self.directory / SINGLE_FILE)
            return [single]
        named = []
        for number, path in enumerate(self.written, start=1):
            final = path.with_name(f"model-{number:05d}-of-{count:05d}.safetensors")
            path.rename(final)
            named.append(final)
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {name: named[shard].name for name, shard in sorted(self.weight_map.items())}}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return named
