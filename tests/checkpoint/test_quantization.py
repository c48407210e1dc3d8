"""FP8 / FP4 / E8M0 decoding against the independent bit-level encoder of tests/helpers."""

import numpy as np
import pytest
import torch

from tests.helpers.official_checkpoint import e2m1_values, e4m3_values, e8m0_value, quantize_fp4, quantize_fp8
from titan_v4.checkpoint.quantization import FP4_VALUES, decode_scales, dequantize_fp4, dequantize_fp8, unpack_fp4


def test_code_tables_match_the_bit_layouts():
    assert np.array_equal(np.array(FP4_VALUES), e2m1_values())
    assert np.signbit(FP4_VALUES[8])  # code 8 is -0
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = codes.view(torch.float8_e4m3fn).double().numpy()
    assert np.array_equal(decoded, e4m3_values(), equal_nan=True)
    scales = decode_scales(codes[:255].view(torch.float8_e8m0fnu)).double().numpy()
    assert np.array_equal(scales, e8m0_value(np.arange(255)))  # 2^-127 (a subnormal fp32) .. 2^127


def test_unpack_fp4_takes_the_low_nibble_first():
    packed = torch.tensor([[0x21, 0xF8], [0x7E, 0x00]], dtype=torch.uint8).view(torch.int8)
    assert unpack_fp4(packed).tolist() == [[0.5, 1.0, -0.0, -6.0], [-4.0, 6.0, 0.0, 0.0]]


@pytest.mark.parametrize("row0", [0, 128, 256])
def test_fp8_blocks_decode_exactly_from_any_row(row0):
    """Rows row0.. of a 384 x 200 weight (3 x 2 blocks, the last column block partial) decode to the
    encoder's values bit for bit, and stay within E4M3's rounding of the original weight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((384, 200)) * np.exp2(rng.integers(-8, 8, size=(384, 1)))
    codes, scales, expected = quantize_fp8(w)
    assert len(np.unique(scales)) > 1
    rows = slice(row0, 384)
    got = dequantize_fp8(
        torch.from_numpy(codes[rows]).view(torch.float8_e4m3fn),
        torch.from_numpy(scales[row0 // 128 :]).view(torch.float8_e8m0fnu),
        row0,
    ).double().numpy()
    assert np.array_equal(got, expected[rows])
    block_scale = np.repeat(np.repeat(e8m0_value(scales), 128, 0), 128, 1)[:384, :200]
    assert np.all(np.abs(got - w[rows]) <= 2.0**-4 * np.maximum(np.abs(w[rows]), 2.0**-6 * block_scale[rows]))


def test_fp8_with_fp32_scales_decodes_the_same():
    """-Base checkpoints store the same power-of-two scales as fp32."""
    w = np.random.default_rng(1).standard_normal((130, 260))
    codes, scales, expected = quantize_fp8(w, scale_dtype="F32")
    got = dequantize_fp8(torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(scales), 0)
    assert np.array_equal(got.double().numpy(), expected)


def test_fp4_groups_decode_exactly():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 128)) * np.exp2(rng.integers(-6, 6, size=(6, 128 // 32))).repeat(32, 1)
    packed, scales, expected = quantize_fp4(w)
    got = dequantize_fp4(torch.from_numpy(packed), torch.from_numpy(scales).view(torch.float8_e8m0fnu)).double().numpy()
    assert np.array_equal(got, expected)
    scale = np.repeat(e8m0_value(scales), 32, 1)
    assert np.all(np.abs(got - w) <= 0.25 * np.maximum(np.abs(w), scale))
    assert np.abs(got - w).max() > 0  # FP4 rounds: the bound above is doing work
