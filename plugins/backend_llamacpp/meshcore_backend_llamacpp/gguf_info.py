"""Read what the backend needs from a GGUF file: the magic, and the number of layers."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from meshcore_backend_llamacpp.models import ModelError

MAGIC = b"GGUF"
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


def check_gguf(path: Path) -> None:
    """Raise ModelError unless ``path`` starts with the GGUF magic."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelError(f"model file {path} cannot be read ({exc.strerror}); check the path "
                         f"and its permissions") from None
    if head != MAGIC:
        raise ModelError(f"model file {path} is not a GGUF file (it starts with {head!r}, "
                         f"not {MAGIC!r}); pass a .gguf model (llama.cpp's format)")


def _read_value(fh: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack("<" + fmt, fh.read(struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        (n,) = struct.unpack("<Q", fh.read(8))
        return fh.read(n).decode(errors="replace")
    if vtype == _ARRAY:
        itype, count = struct.unpack("<IQ", fh.read(12))
        if itype in _SCALARS:  # skip fixed-size items without reading them
            fh.seek(count * struct.calcsize(_SCALARS[itype]), 1)
        else:
            for _ in range(count):
                _read_value(fh, itype)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def metadata(path: Path, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Header key/values read in order until ``wanted(seen)`` is true (arrays are skipped).

    Only the header is read: gguf's GGUFReader parses every tensor and takes seconds."""
    seen: dict[str, Any] = {}
    with path.open("rb") as fh:
        if fh.read(4) != MAGIC:
            raise ValueError("not a GGUF file")
        _version, _tensors, kv_count = struct.unpack("<IQQ", fh.read(20))
        for _ in range(kv_count):
            (n,) = struct.unpack("<Q", fh.read(8))
            key = fh.read(n).decode(errors="replace")
            (vtype,) = struct.unpack("<I", fh.read(4))
            seen[key] = _read_value(fh, vtype)
            if wanted(seen):
                break
    return seen


def block_count(path: Path) -> int:
    """``<arch>.block_count`` (transformer layers) from the GGUF metadata."""

    def done(seen: dict[str, Any]) -> bool:
        arch = seen.get("general.architecture")
        return arch is not None and f"{arch}.block_count" in seen

    try:
        seen = metadata(path, done)
        return int(seen[f"{seen['general.architecture']}.block_count"])
    except (KeyError, ValueError, struct.error, OSError) as exc:
        raise ModelError(f"model file {path}: cannot read its layer count from the GGUF "
                         f"metadata ({exc!r}); is the file complete?") from None
