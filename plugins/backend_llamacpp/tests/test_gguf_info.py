"""GGUF checks: the magic, and the layer count read from the header alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from meshcore_backend_llamacpp import gguf_info
from meshcore_backend_llamacpp.models import ModelError


def tiny_gguf(path: Path, blocks: int) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_token_list([b"a", b"b", b"c"])  # an array before nothing else we need
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_block_count_from_header(tmp_path: Path) -> None:
    path = tiny_gguf(tmp_path / "tiny.gguf", 7)
    gguf_info.check_gguf(path)
    assert gguf_info.block_count(path) == 7


def test_non_gguf_file_names_the_problem(tmp_path: Path) -> None:
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(ModelError, match=r"weights\.gguf is not a GGUF file"):
        gguf_info.check_gguf(bad)
    with pytest.raises(ModelError, match="layer count"):
        gguf_info.block_count(bad)
