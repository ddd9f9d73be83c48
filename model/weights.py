"""CheckpointReader: single tensors of a Hugging Face safetensors checkpoint, by the checkpoint's own
names; a shard file is opened only when one of its tensors is asked for. A block-wise FP8 weight
(config.json's quantization_config) is dequantized as it is read, unless its raw FP8 form and
scales are asked for (`get_fp8`, for a GPU that keeps them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from model.config import ConfigError, QuantConfig, quant_config_from_hf
from model.fp8 import FP8_DTYPES, dequantize_blockwise, scale_shape

INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot serve what was asked of it; the message names the tensor or file."""


class CheckpointReader:
    """`accessed` lists every tensor read and `files_opened` every shard file opened to read one (a
    header scan of an index-less directory does not count), so tests can prove partial loading."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_FILE
        self._file_of: dict[str, str] = _read_index(index) if index.is_file() else _scan_headers(self.path)
        self._handles: dict[str, Any] = {}
        self.accessed: list[str] = []
        self.files_opened: set[str] = set()
        self._quant: QuantConfig | bool | None = False  # False: config.json not read yet

    def names(self) -> set[str]:
        return set(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> str:
        """The file (relative to the checkpoint directory) that holds `name`."""
        if name not in self._file_of:
            files = len(set(self._file_of.values()))
            raise CheckpointError(f"tensor {name!r} is not in checkpoint {self.path} "
                                  f"({len(self._file_of)} tensors in {files} files)")
        return self._file_of[name]

    def get(self, name: str, *, shape: tuple[int, ...] | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor; `shape` is checked from the header before the data is read. An FP8
        weight comes back dequantized (float32 when `dtype` is None)."""
        tensor = self._read(name, shape)
        if tensor.dtype in FP8_DTYPES:
            scale_inv, block = self._scale_of(name, tensor)
            return dequantize_blockwise(tensor, scale_inv, block, dtype or torch.float32)
        return tensor if dtype is None else tensor.to(dtype)

    def is_fp8(self, name: str) -> bool:
        """Whether `name` is stored as FP8 (read from the header, not the data)."""
        file = self.file_of(name)
        return self._open(file, name).get_slice(name).get_dtype() in ("F8_E4M3", "F8_E4M3FNUZ")

    def get_fp8(self, name: str, *, shape: tuple[int, ...] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """An FP8 weight as stored: (float8 [N, K], its float32 scale_inv [ceil(N/bn), ceil(K/bk)],
        the tile (bn, bk)); checked like `get`."""
        tensor = self._read(name, shape)
        if tensor.dtype not in FP8_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {self.path} is {tensor.dtype}, not FP8")
        scale_inv, block = self._scale_of(name, tensor)
        return tensor, scale_inv, block

    def quantization(self) -> QuantConfig | None:
        """config.json's quantization_config beside the weights (read once; None without one)."""
        if self._quant is False:
            cfg = self.path / "config.json"
            try:
                raw = json.loads(cfg.read_text()) if cfg.is_file() else {}
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{cfg}: not valid JSON ({e})") from e
            try:
                self._quant = quant_config_from_hf(raw.get("quantization_config"))
            except ConfigError as e:
                raise CheckpointError(str(e)) from e
        return self._quant  # type: ignore[return-value]

    def _scale_of(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        quant = self.quantization()
        if quant is None:
            raise CheckpointError(f"tensor {name!r} in {self.path} is stored as {weight.dtype}, but "
                                  f"config.json has no quantization_config to say how to scale it")
        module = name.rsplit(".", 1)[0]
        if not quant.converts(module):
            raise CheckpointError(f"tensor {name!r} in {self.path} is stored as {weight.dtype}, but "
                                  f"quantization_config.modules_to_not_convert lists {module!r}")
        scale_name = name + "_scale_inv"
        if not self.has(scale_name):
            raise CheckpointError(f"tensor {name!r} in {self.path} is FP8 but its block scales "
                                  f"{scale_name!r} are not in the checkpoint")
        scale = self._read(scale_name, scale_shape(weight.shape, quant.block))
        return scale.float(), quant.block

    def _read(self, name: str, shape: tuple[int, ...] | None) -> torch.Tensor:
        file = self.file_of(name)
        handle = self._open(file, name)
        try:
            if shape is not None:
                actual = tuple(handle.get_slice(name).get_shape())
                if actual != tuple(shape):
                    raise CheckpointError(f"tensor {name!r} in {self.path / file} has shape {actual}, "
                                          f"expected {tuple(shape)}")
            tensor = handle.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path / file}: {e}") from e
        self.accessed.append(name)
        return tensor

    def close(self) -> None:
        self._handles.clear()  # safetensors unmaps a file when its handle is dropped

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self, file: str, name: str) -> Any:
        if file not in self._handles:
            full = self.path / file
            # Checked here, not at construction: an expert-shard actor may hold a partial copy of
            # the checkpoint, and a shard it never reads from need not be there.
            if not full.is_file():
                raise CheckpointError(f"tensor {name!r} is in {file} according to {INDEX_FILE}, "
                                      f"but {full} does not exist")
            try:
                self._handles[file] = safe_open(str(full), framework="pt")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot open {full} (needed for tensor {name!r}): {e}") from e
            self.files_opened.add(file)
        return self._handles[file]


def _read_index(index: Path) -> dict[str, str]:
    try:
        raw = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from e
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' object mapping tensor names to files")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).is_absolute() or ".." in Path(file).parts:
            raise CheckpointError(f"{index}: 'weight_map' entry {name!r} -> {file!r} is not a file name "
                                  f"inside the checkpoint directory")
    return dict(weight_map)


def _scan_headers(path: Path) -> dict[str, str]:
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
    file_of: dict[str, str] = {}
    for file in files:
        try:
            with safe_open(str(path / file), framework="pt") as f:
                names = list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / file}: not a readable safetensors file ({e})") from e
        for name in names:
            if name in file_of:
                raise CheckpointError(f"{path}: tensor {name!r} is in both {file_of[name]} and {file} "
                                      f"and there is no {INDEX_FILE} to say which one to use")
            file_of[name] = file
    return file_of
