"""Checkpoint files on disk: the DeepSpeed-style manifest, safetensors and .bin/.pt readers.

`iter_checkpoint` yields `(hf_name, tensor)` one tensor at a time, so the loader can place
each where the plan says without ever holding a second copy of the model.
"""

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from zinfer.errors import CheckpointError

MANIFEST_NAMES = ("checkpoints.json", "ds_inference_config.json")


def read_manifest(directory: Path) -> list[Path] | None:
    """Files listed by a DeepSpeed `{"type", "checkpoints", "version"}` manifest, if there is one."""
    for name in MANIFEST_NAMES:
        path = directory / name
        if path.exists():
            data = json.loads(path.read_text())
            files = data.get("checkpoints")
            if not isinstance(files, list) or not files:
                raise CheckpointError(f"{path}: manifest has no 'checkpoints' list")
            # DeepSpeed writes absolute paths; accept names relative to the directory too
            return [Path(f) if Path(f).is_absolute() else directory / f for f in files]
    return None


def scan_checkpoint(directory: Path) -> list[Path]:
    """Weight files of a Hugging Face directory: index.json shards, else *.safetensors, else *.bin/*.pt."""
    manifest = read_manifest(directory)
    if manifest is not None:
        return manifest
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (directory / index).exists():
            weight_map = json.loads((directory / index).read_text())["weight_map"]
            return [directory / f for f in sorted(set(weight_map.values()))]
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        files = sorted(p for p in directory.glob(pattern) if p.name != "training_args.bin")
        if files:
            return files
    raise CheckpointError(f"no weights in {directory}: expected *.safetensors, *.bin or *.pt files")


def write_manifest(directory: Path, files: list[Path], model_type: str) -> Path:
    """Write DeepSpeed's checkpoint manifest (`checkpoints.json`) listing the weight files."""
    path = directory / "checkpoints.json"
    data = {"type": model_type, "checkpoints": [f.name for f in files], "version": 1.0}
    path.write_text(json.dumps(data, indent=1))
    return path


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The tensor table and the offset where data starts; fails clearly on truncation or corruption."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated safetensors file: header says {header_len} bytes, "
                                  f"file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: tensors need {8 + header_len + end} "
                              f"bytes, file has {size}")
    return header, 8 + header_len


def iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Read each tensor with one `readinto` into memory it owns: no mmap pages kept resident, no extra copy."""
    header, base = read_safetensors_header(path)
    with open(path, "rb", buffering=0) as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(base + begin)
            if f.readinto(memoryview(raw.numpy())) != end - begin:
                raise CheckpointError(f"{path}: short read for tensor {name!r}")
            yield name, raw.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def iter_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if not path.exists():
        raise CheckpointError(f"checkpoint file {path} is listed but does not exist")
    if path.suffix == ".safetensors":
        yield from iter_safetensors(path)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a bad zip or pickle
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    for name, tensor in state.items():
        # the mmap'd tensors borrow the file; copy each so the model owns its memory
        yield name, tensor.clone()


def iter_checkpoint(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        yield from iter_file(path)
