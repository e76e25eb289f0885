"""Weight files in transformers' folder layout, read one tensor at a time and written whole or sharded.

Reading: model.safetensors, model.safetensors.index.json (shards), pytorch_model.bin or
pytorch_model.bin.index.json, the first found in that order (``use_safetensors`` True: only the
safetensors ones; False: only the .bin ones). Safetensors files are opened with ``safe_open`` and
.bin files memory-mapped, so a tensor is read only when it is copied into the model: loading never
holds a second full copy of the weights. The positional conv's weight norm is read in either
spelling (``conv.weight_g``/``conv.weight_v`` or ``conv.parametrizations.weight.original0``/``1``)
and named in the second, which is what transformers 5.x saves.

Writing: one file, or shards of at most ``max_shard_size`` bytes (a larger tensor gets a shard of
its own) named as transformers names them, with the index json that both loaders read. Weight
files of those names already in the folder are removed first, so a stale file never shadows the
new ones.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch

SAFE_NAME, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_NAME, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SHARD_PATTERN = re.compile(r"^(model|pytorch_model)-\d{5}-of-\d{5}\.(safetensors|bin)$")
WEIGHT_NORM_SPELLINGS = {"conv.weight_g": "conv.parametrizations.weight.original0",
                         "conv.weight_v": "conv.parametrizations.weight.original1"}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
               "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


class _SafetensorsFile:
    def __init__(self, path: str):
        from safetensors import safe_open
        self.handle = safe_open(path, framework="pt")
        self.names = list(self.handle.keys())

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.handle.get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)


class _BinFile:
    def __init__(self, path: str):
        self.state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(self.state, dict) or not all(isinstance(v, torch.Tensor) for v in self.state.values()):
            raise ValueError("it does not hold a dict of tensors")
        self.names = list(self.state)

    def shape(self, name: str) -> torch.Size:
        return self.state[name].shape

    def tensor(self, name: str) -> torch.Tensor:
        return self.state[name]


def _open(path: str):
    try:
        return _SafetensorsFile(path) if path.endswith(".safetensors") else _BinFile(path)
    except Exception as e:  # corrupt, truncated or not a checkpoint at all
        raise ValueError(f"could not read checkpoint file {path}: {type(e).__name__}: {e}") from None


def _index_files(folder: str, index_name: str) -> Tuple[List[str], dict]:
    """(shard paths, the index's metadata)."""
    path = os.path.join(folder, index_name)
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid shard index (needs a 'weight_map'): {e}") from None
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            raise OSError(f"{path} names shard {shard!r}, which is missing from {folder}")
    return [os.path.join(folder, s) for s in shards], index.get("metadata") or {}


def _normalised(name: str) -> str:
    for old, new in WEIGHT_NORM_SPELLINGS.items():
        if name.endswith("pos_conv_embed." + old):
            return name[: -len(old)] + new
    return name


class CheckpointTensors:
    """The tensors of a checkpoint folder by name, each read from its file when asked for."""

    def __init__(self, folder: str, use_safetensors: Optional[bool] = None):
        candidates = {None: (SAFE_NAME, SAFE_INDEX, BIN_NAME, BIN_INDEX), True: (SAFE_NAME, SAFE_INDEX),
                      False: (BIN_NAME, BIN_INDEX)}
        if use_safetensors not in candidates:
            raise ValueError(f"use_safetensors must be None, True or False, got {use_safetensors!r}")
        names = candidates[use_safetensors]
        found = next((n for n in names if os.path.isfile(os.path.join(folder, n))), None)
        if found is None:
            which = "" if use_safetensors is None else f" (use_safetensors={use_safetensors})"
            raise OSError(f"no weights in {folder}{which}: expected one of {', '.join(names)}")
        self.metadata: dict = {}
        paths = [os.path.join(folder, found)]
        if found.endswith(".json"):
            paths, self.metadata = _index_files(folder, found)
        self._where: Dict[str, Tuple[object, str]] = {}
        for path in paths:
            file = _open(path)
            for stored in file.names:
                self._where[_normalised(stored)] = (file, stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> torch.Size:
        file, stored = self._where[name]
        return file.shape(stored)

    def __getitem__(self, name: str) -> torch.Tensor:
        file, stored = self._where[name]
        return file.tensor(stored)

    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype as transformers reads it: the index's, else the first floating tensor's."""
        if self.metadata.get("dtype"):
            return getattr(torch, str(self.metadata["dtype"]).replace("torch.", ""))
        for name in self:
            tensor = self[name]
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "10KB", "5MB", "2GiB" (KB = 1000 bytes, KiB = 1024)."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size).upper())
        if match is None:
            raise ValueError(f"max_shard_size {size!r} is not a size: give bytes as an int or a string such as "
                             "'500MB' or '2GiB'")
        value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or ""])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def _shards(state: Dict[str, torch.Tensor], limit: int) -> List[List[str]]:
    """Tensor names in order, cut into shards of at most ``limit`` bytes (an oversized tensor alone)."""
    shards: List[List[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _remove_weight_files(folder: str):
    for name in os.listdir(folder):
        if name in (SAFE_NAME, SAFE_INDEX, BIN_NAME, BIN_INDEX) or SHARD_PATTERN.match(name):
            os.remove(os.path.join(folder, name))


def write_weights(folder: str, state: Dict[str, torch.Tensor], safe_serialization: bool = True,
                  max_shard_size: Union[int, str] = "50GB") -> List[str]:
    """Write ``state`` (contiguous CPU tensors) as safetensors or .bin files; returns the file names."""
    if not isinstance(safe_serialization, bool):
        raise TypeError(f"safe_serialization must be True or False, got {safe_serialization!r}")
    shards = _shards(state, parse_size(max_shard_size))
    _remove_weight_files(folder)
    single, index_name = (SAFE_NAME, SAFE_INDEX) if safe_serialization else (BIN_NAME, BIN_INDEX)
    stem, ext = single.rsplit(".", 1)
    names = [single] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
                                                for i in range(len(shards))]
    for name, keys in zip(names, shards):
        part = {k: state[k] for k in keys}
        path = os.path.join(folder, name)
        if safe_serialization:
            from safetensors.torch import save_file
            save_file(part, path, metadata={"format": "pt"})
        else:
            torch.save(part, path)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(t.numel() for t in state.values()),
                              "total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        with open(os.path.join(folder, index_name), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        names.append(index_name)
    return names
