"""titan_v4.model.rope against the formulas written out independently (fp64)."""

import math

import pytest
import torch

from tests.helpers.tiny_model import close, tiny_args
from titan_v4.model.rope import apply_rope, rope_inv_freq, rope_table


def test_rope_main_frequencies_are_plain():
    a = tiny_args()
    expected = [1.0 / a.rope_theta ** (2 * i / a.rope_head_dim) for i in range(a.rope_head_dim // 2)]
    assert torch.allclose(rope_inv_freq(a, a.rope_theta, yarn=False).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6)


def test_rope_yarn_frequencies_follow_the_yarn_formula():
    """YaRN (paper eq. / official precompute_freqs_cis): high frequencies kept, low ones divided by
    `factor`, a linear ramp between the correction dims (floor / ceil), no mscale."""
    a = tiny_args(head_dim=64, index_head_dim=32, rope_head_dim=32, original_seq_len=4096, rope_factor=16.0, beta_fast=32.0, beta_slow=1.0)
    dim, base = a.rope_head_dim, a.compress_rope_theta
    freqs = [base ** (-2 * i / dim) for i in range(dim // 2)]

    def corr(rot):
        return dim * math.log(a.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr(a.beta_fast)), 0), min(math.ceil(corr(a.beta_slow)), dim - 1)
    expected = []
    for i, f in enumerate(freqs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        expected.append(f / a.rope_factor * ramp + f * (1 - ramp))
    got = rope_inv_freq(a, base, yarn=True).double()
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-6)
    assert got[0] == pytest.approx(freqs[0], rel=1e-6) and got[-1] == pytest.approx(freqs[-1] / 16, rel=1e-6)
    assert 0 < low < high < dim // 2  # the ramp is exercised


def test_apply_rope_is_an_interleaved_complex_rotation_of_the_trailing_channels():
    a = tiny_args()
    cos, sin = rope_table(a, a.rope_theta, yarn=False)[:, :10].double()
    x = torch.randn(2, 10, 3, a.head_dim, dtype=torch.float64)
    out = apply_rope(x, cos, sin)
    r = a.rope_head_dim
    z = torch.view_as_complex(x[..., -r:].reshape(2, 10, 3, r // 2, 2).contiguous())
    rot = torch.view_as_real(z * torch.complex(cos, sin)[:, None]).flatten(-2)
    close(out[..., -r:], rot)
    assert torch.equal(out[..., :-r], x[..., :-r])
    close(apply_rope(out, cos, -sin), x, dtype=torch.float32)  # de-rotation inverts it (fp32 tables)
    assert apply_rope(x.float(), cos.float(), sin.float()).dtype == torch.float32
    assert apply_rope(x.bfloat16(), cos.float(), sin.float()).dtype == torch.bfloat16


def test_roped_dot_products_depend_on_relative_position_only():
    a = tiny_args()
    cos, sin = rope_table(a, a.compress_rope_theta, yarn=True).double()
    q, k = torch.randn(2, a.rope_head_dim, dtype=torch.float64)
    qs = apply_rope(q.expand(1, 40, -1), cos[:40], sin[:40])[0]
    ks = apply_rope(k.expand(1, 40, -1), cos[:40], sin[:40])[0]
    assert torch.allclose(qs[10] @ ks[7], qs[30] @ ks[27], rtol=1e-5)
