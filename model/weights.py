"""CheckpointReader: reads single tensors by their Hugging Face names from a checkpoint directory
(one or several safetensors files, with or without model.safetensors.index.json)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot serve a tensor; the message names the tensor and the file."""


class CheckpointReader:
    """Maps tensor names to files from the index (or the files' headers) and opens a file only
    when one of its tensors is asked for, so a caller that needs a slice of the model (an expert
    shard) reads nothing else and may even run from a partial copy of the checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self._where = self._index()
        self._open: dict[str, object] = {}
        self.accessed: list[str] = []
        self.files_opened: set[str] = set()

    def _index(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: 'weight_map' must map tensor names to files")
            return dict(weight_map)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no *.safetensors files and no {INDEX_FILE}")
        where: dict[str, str] = {}
        for f in files:
            with safe_open(f, framework="pt") as handle:  # reads the header only
                where.update(dict.fromkeys(handle.keys(), f.name))
        return where

    def names(self) -> set[str]:
        return set(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        if name not in self._where:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint {self.path}")
        return self._where[name]

    def get(self, name: str, *, shape: tuple[int, ...] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor; checks its shape when `shape` is given, casts when `dtype` is."""
        file = self.file_of(name)
        handle = self._handle(file, name)
        tensor = handle.get_tensor(name)
        self.accessed.append(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {file} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(shape)}")
        return tensor if dtype is None else tensor.to(dtype)

    def _handle(self, file: str, name: str):
        if file not in self._open:
            full = self.path / file
            if not full.is_file():
                raise CheckpointError(f"tensor {name!r} is in {file}, which is missing from {self.path}")
            try:
                self._open[file] = safe_open(full, framework="pt")
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{full}: not a readable safetensors file ({e})") from e
            self.files_opened.add(file)
        return self._open[file]
