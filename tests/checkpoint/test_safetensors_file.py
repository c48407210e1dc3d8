"""safetensors framing: row-range reads, writing, agreement with the `safetensors` package, and a
truncated file named in the error."""

import pytest
import torch

from titan_v4.checkpoint.safetensors_file import SafetensorsFormatError, read_header, write_file

safetensors_torch = pytest.importorskip("safetensors.torch")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "bf16": torch.randn(5, 3, generator=g).bfloat16(),
        "f32_3d": torch.randn(4, 2, 3, generator=g),
        "i64": torch.randint(-(2**40), 2**40, (7, 2), generator=g),
        "fp8": torch.randn(3, 4, generator=g).to(torch.float8_e4m3fn),
        "e8m0": torch.randint(0, 255, (2, 2), generator=g).to(torch.uint8).view(torch.float8_e8m0fnu),
        "scalar": torch.tensor(3.5),
        "vector": torch.arange(6, dtype=torch.int8),
    }


def test_written_files_read_back_row_by_row(tmp_path):
    tensors = sample_tensors()
    size = write_file(tmp_path / "a.safetensors", tensors, metadata={"format": "pt"})
    assert size == (tmp_path / "a.safetensors").stat().st_size
    stored = read_header(tmp_path / "a.safetensors")
    for name, t in tensors.items():
        s = stored[name]
        assert (s.shape, s.torch_dtype) == (tuple(t.shape), t.dtype)
        whole = s.read_rows(0, t.shape[0] if t.dim() else 1)
        assert same_bits(whole, t), name
    assert torch.equal(stored["i64"].read_rows(2, 5), tensors["i64"][2:5])
    assert torch.equal(stored["f32_3d"].read_rows(1, 3), tensors["f32_3d"][1:3])
    assert stored["bf16"].read_rows(2, 2).shape == (0, 3)
    with pytest.raises(IndexError, match="rows 4:9 are out of range"):
        stored["bf16"].read_rows(4, 9)


def test_agrees_with_the_safetensors_package(tmp_path):
    tensors = sample_tensors()
    write_file(tmp_path / "ours.safetensors", tensors)
    theirs = safetensors_torch.load_file(tmp_path / "ours.safetensors")
    assert all(same_bits(theirs[k], v) for k, v in tensors.items())
    safetensors_torch.save_file(tensors, tmp_path / "theirs.safetensors")
    stored = read_header(tmp_path / "theirs.safetensors")
    assert torch.equal(stored["i64"].read_rows(0, 7), tensors["i64"])
    assert torch.equal(stored["bf16"].read_rows(1, 4), tensors["bf16"][1:4])


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "model-00002-of-00003.safetensors"
    write_file(path, sample_tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(SafetensorsFormatError, match=r"model-00002-of-00003.safetensors is truncated: vector ends at byte \d+ but the file has \d+ bytes"):
        read_header(path)
    path.write_bytes(data[:40])
    with pytest.raises(SafetensorsFormatError, match="the header claims .* bytes but the file has 40"):
        read_header(path)
    path.write_bytes(b"\x01")
    with pytest.raises(SafetensorsFormatError, match="too short for a safetensors file"):
        read_header(path)
