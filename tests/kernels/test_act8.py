"""The act8 kernel for batched rows (prefill): the register-tiled path against the one-row path and the reference.

The batched path (several weight rows times several rows of x per step, csrc/act8_rows.inc) computes the same int32
sums as the one-row decode loop, lane for lane, and reduces them in the same order, so each of its outputs must equal
the one-row kernel's bit for bit: for ragged row counts (tile tails in x), row ranges that leave tile tails in the
weights, every kernel width, every variant this CPU runs, and 1 against 2 threads. The activation quantization
(vectorized) must round exactly as the PyTorch reference (`quantize_act8_reference`), ties to even included.
"""

import pytest
import torch

from pippin.kernels import ops
from pippin.quant.linear import PalettizedLinear, quantize_act8_reference
from pippin.quant.palettize import fit_palette
from tests.conftest import kernel_variants, use_variant

pytestmark = pytest.mark.skipif(ops() is None, reason="pippin kernels unavailable (no AVX2 or no compiler)")

N, K = 140, 128  # 140 rows: two threads take 70 each, 8 tiles of 8 (or 17 of 4) and a tail of single rows


def _layer(bits: int, group: int) -> PalettizedLinear:
    g = torch.Generator().manual_seed(bits * 10 + group)
    lin = PalettizedLinear.from_palette(fit_palette(torch.randn(N, K, generator=g), bits=bits, group_size=group))
    lin.act8 = True
    assert lin.uses_act8_kernel()
    return lin


def _x(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Activations of very different sizes per 64-block (one scale each), as real hidden states have.
    block_size = torch.rand(rows, K // 64, 1, generator=g).mul(8).add(0.1)
    return (torch.randn(rows, K // 64, 64, generator=g) * block_size).view(rows, K)


@pytest.mark.parametrize(("bits", "group"), [(2, 4), (3, 140), (4, 1), (6, 4), (8, 2)])
def test_batched_rows_equal_the_one_row_kernel_bit_for_bit(bits, group):
    lin = _layer(bits, group)
    w, lut, scale, kernel_bits = lin.act8_kernel_args()
    assert kernel_bits == {2: 2, 3: 4, 4: 4, 6: 8, 8: 8}[bits]
    threads = torch.get_num_threads()
    try:
        for rows in (1, 3, 17, 45, 512):
            x = _x(rows, rows)
            ref = lin._act8_reference(x)
            outs = []
            for variant in kernel_variants():
                with use_variant(variant):
                    for n_threads in (1, 2):
                        torch.set_num_threads(n_threads)
                        outs.append(ops().lut_gemv_act8(x, w, lut, scale, kernel_bits, lin.group_size))
                    # The one-row (decode) loop on each row of x: the same floats as the batched tiles.
                    one = torch.cat([ops().lut_gemv_act8(x[i : i + 1], w, lut, scale, kernel_bits, lin.group_size) for i in range(rows)])
                assert torch.equal(outs[-1], one), (variant, rows)
                torch.testing.assert_close(outs[-1], ref, atol=1e-4, rtol=1e-4)
            assert all(torch.equal(o, outs[0]) for o in outs), rows  # every variant and thread count alike
    finally:
        torch.set_num_threads(threads)


def test_a_3d_batch_equals_its_rows_flattened():
    # A prefill's (B, T, K) input is B * T rows of x for the kernel.
    lin = _layer(4, 4)
    w, lut, scale, kernel_bits = lin.act8_kernel_args()
    x = _x(2 * 37, 7)
    flat = ops().lut_gemv_act8(x, w, lut, scale, kernel_bits, lin.group_size)
    assert torch.equal(ops().lut_gemv_act8(x.view(2, 37, K), w, lut, scale, kernel_bits, lin.group_size), flat.view(2, 37, N))


def test_activation_quantization_rounds_as_the_reference_ties_to_even():
    # A block whose absmax is 63 has scale exactly 1, so x / scale lands on halves: round-half-even gives 2, -4, 0, 4
    # (sum with the 63: 65) where rounding half away from zero would give 3, -4, 1, 5 (sum 68).
    x = _x(5, 3)
    x[0] = 0.0
    x[0, :5] = torch.tensor([63.0, 2.5, -3.5, 0.5, 4.5])
    assert quantize_act8_reference(x)[0, :5].tolist() == [63.0, 2.0, -4.0, 0.0, 4.0]
    ones = PalettizedLinear.from_palette(fit_palette(torch.ones(8, K), bits=2, group_size=8))  # every weight the same
    ones.act8 = True
    w, lut, scale, kernel_bits = ones.act8_kernel_args()
    weight = (lut[0, 0].float() * scale[0]).item()  # the int8 LUT value as act8 multiplies it
    for rows in (x[:1], x):  # the one-row path and the batched one
        y = ops().lut_gemv_act8(rows, w, lut, scale, kernel_bits, 8)
        assert y[0].tolist() == pytest.approx([65 * weight] * 8, rel=1e-6)
        torch.testing.assert_close(y, ones._act8_reference(rows), atol=1e-4, rtol=1e-5)
