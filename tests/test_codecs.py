"""The codecs against first principles: exact packing, error bounds of the 4/8-bit codes, bnb's 8-bit map."""

import math

import pytest
import torch

from muonq_hf.codecs import (
    compand,
    dequantize,
    dequantize_dynamic8,
    dynamic_codebook,
    expand,
    pack4,
    quantize,
    quantize_dynamic8,
    unpack4,
)


def unit_frobenius(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm()


@pytest.mark.parametrize("n", [1, 2, 7, 64, 65])
def test_pack4_roundtrip_and_layout(n):
    q = torch.randint(-8, 8, (3, 5, n), dtype=torch.int8)
    packed = pack4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, math.ceil(n / 2))
    assert torch.equal(unpack4(packed, n), q)
    # row i of the codes holds exactly row i of the values: row shards of codes are shards of the matrix
    assert torch.equal(unpack4(packed[:, 2:4], n), q[:, 2:4])
    # low nibble first, an odd row padded with the zero code: -8 -> 0, 7 -> 15, 1 -> 9, pad -> 8
    assert pack4(torch.tensor([[-8.0, 7.0, 1.0]])).tolist() == [[0 + 16 * 15, 9 + 16 * 8]]


@pytest.mark.parametrize(("granularity", "block_size", "shape"), [("matrix", None, (3, 256, 384)),
                                                                  ("column", None, (2, 384, 24)),
                                                                  ("block", 64, (1, 96, 200))])
def test_nearest_4bit_mu_law_codes_are_rounded_companded_values(granularity, block_size, shape):
    """4-bit mu-law codes count level boundaries instead of computing C(x) / s; they must be round(C(x) / s),
    computed here in float64 from the stored fp16 scale, for every value not within 1e-5 of a rounding boundary
    (there fp32 and float64 may round either way)."""
    x = unit_frobenius(torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    codes, scale = quantize(x, 4, 255.0, granularity, block_size)
    s = scale.double()
    if granularity == "block":
        s = s.repeat_interleave(block_size, dim=-1)[..., : shape[-1]]
    x64 = x.double()
    z = torch.sign(x64) * torch.log1p(255.0 * x64.abs()) / math.log1p(255.0) / s
    ref = torch.round(z).clamp(-8, 7)
    got = unpack4(codes, shape[-1]).double()
    clear = ((z.abs() - z.abs().floor() - 0.5).abs() > 1e-5)  # not within 1e-5 of a boundary k - 1/2
    wrong = (got != ref) & clear
    assert int(wrong.sum()) == 0, f"{int(wrong.sum())} of {x.numel()} codes differ, first at z = {z[wrong][:3]}"
    assert int((got != ref).sum()) <= x.numel() * 1e-5  # and the boundary cases are rare
    assert ref.abs().max() == 7  # the test covers the whole range of codes


def test_compand_is_a_bijection_beyond_unit_interval():
    x = torch.linspace(-3, 3, 1001)
    for mu in (0.0, 15.0, 255.0):
        torch.testing.assert_close(expand(compand(x, mu), mu), x, atol=1e-5, rtol=1e-5)
    assert torch.equal(compand(x, 0.0), x)


@pytest.mark.parametrize("mu", [15.0, 255.0])
def test_compand_and_expand_equal_the_spec_formulas_and_leave_inputs_alone(mu):
    """C(x) = sign(x) ln(1 + mu|x|) / ln(1 + mu) and its inverse, element for element (no tolerance)."""
    x = torch.cat([torch.randn(10_000), torch.randn(10_000) * 1e-6, torch.tensor([0.0, 1.0, -1.0, 3.0])])
    x_before = x.clone()
    y = compand(x, mu)
    assert torch.equal(y, x.sign() * torch.log1p(mu * x.abs()) / math.log1p(mu))
    assert torch.equal(expand(y, mu), y.sign() * torch.expm1(y.abs() * math.log1p(mu)) / mu)
    assert torch.equal(x, x_before)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("mu", [0.0, 255.0])
@pytest.mark.parametrize("shape", [(3, 64, 33), (5, 7), (2, 2, 16, 9), (1, 1)])
def test_matrix_dequantize_table_equals_the_formula(bits, mu, shape):
    """With one scale per matrix, dequantize decodes through a byte table; it must equal C^-1(q s) per code.

    Tolerance: 1 ulp (2^-23 relative), for a libm whose scalar and vectorized expm1 differ in the last bit.
    """
    torch.manual_seed(0)
    x = torch.randn(shape)
    codes, scale = quantize(x, bits, mu)
    q = unpack4(codes, shape[-1]) if bits == 4 else codes.view(torch.int8)
    formula = expand(q.float() * scale.float(), mu)
    torch.testing.assert_close(dequantize(codes, scale, shape[-1], bits, mu), formula, rtol=2**-23, atol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_code_error_is_at_most_half_a_step(bits):
    x = torch.randn(2, 33, 47)
    codes, scale = quantize(x, bits)
    y = dequantize(codes, scale, 47, bits)
    qmax = 7 if bits == 4 else 127
    step = x.abs().amax(dim=(-2, -1), keepdim=True) / qmax
    # half a step, plus the fp16 rounding of the scale (relative 2^-11) times the largest code
    assert ((y - x).abs() <= step / 2 + step * qmax * 2**-11 + 1e-7).all()
    assert scale.dtype == torch.float16 and scale.shape == (2, 1, 1)


def test_mu_law_beats_linear_on_normalized_momentum():
    """The paper's technique 3: on unit-Frobenius matrices, 4-bit mu-law keeps direction better than linear,
    by a wide margin on heavy-tailed data (Student-t, 3 dof)."""
    torch.manual_seed(0)
    gauss = unit_frobenius(torch.randn(1, 256, 256))
    heavy = unit_frobenius(torch.distributions.StudentT(3.0).sample((1, 256, 256)))

    def rel_err(x, mu):
        codes, scale = quantize(x, 4, mu)
        return float((dequantize(codes, scale, 256, 4, mu) - x).norm() / x.norm())

    assert rel_err(gauss, 255.0) < 0.9 * rel_err(gauss, 0.0)
    assert rel_err(heavy, 255.0) < 0.7 * rel_err(heavy, 0.0)
    assert rel_err(gauss, 255.0) < 0.2


def test_block_scales_are_row_aligned():
    x = torch.randn(1, 6, 10)
    x[0, 0] *= 100  # one loud row must not crush the resolution of the others
    codes, scale = quantize(x, 4, 0.0, "block", 4)
    assert scale.shape == (1, 6, 3)  # ceil(10 / 4) blocks per row
    y = dequantize(codes, scale, 10, 4, 0.0, "block", 4)
    codes_m, scale_m = quantize(x, 4)
    y_m = dequantize(codes_m, scale_m, 10, 4)
    quiet = slice(1, 6)
    assert (y - x)[0, quiet].norm() < 0.2 * (y_m - x)[0, quiet].norm()


def test_column_scales():
    x = torch.randn(3, 40, 5) * torch.tensor([1.0, 10, 100, 1000, 0.01])
    codes, scale = quantize(x, 4, 0.0, "column")
    assert scale.shape == (3, 1, 5)
    y = dequantize(codes, scale, 5, 4, 0.0, "column")
    assert ((y - x).abs() <= x.abs().amax(dim=-2, keepdim=True) / 14 * 1.01).all()


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.full((1, 1, 20000), 0.3)
    x[0, 0, 0] = 1.0  # fixes the scale: 1/7, so 0.3 lies between codes 2 and 3 (0.1 * 7 = 2.1)
    g = torch.Generator().manual_seed(0)
    codes, scale = quantize(x, 4, stochastic=True, generator=g)
    y = dequantize(codes, scale, 20000, 4)[0, 0, 1:]
    # each draw is 2/7 or 3/7 with p(3/7) = 0.1; the mean of 19999 draws has std (1/7) * sqrt(0.09 / 19999)
    std = (1 / 7) * math.sqrt(0.09 / 19999)
    assert abs(float(y.mean()) - 0.3) < 5 * std
    codes2, _ = quantize(x, 4, stochastic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes, codes2)
    codes_nearest, _ = quantize(x, 4)
    two_steps = 2 * scale.float().flatten()  # fp16 scale of 1/7
    assert torch.equal(dequantize(codes_nearest, scale, 20000, 4)[0, 0, 1:], two_steps.expand(19999))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic8_table_search_equals_bucketize_bit_for_bit(signed):
    """The bf16-bucket table search must give torch.bucketize's code for every input, ties included."""
    codebook = dynamic_codebook(signed)
    midpoints = (codebook.values[1:] + codebook.values[:-1]) / 2
    torch.manual_seed(0)
    uniform = torch.rand(200_000) * 2 - 1
    gaussian = torch.randn(200_000).clamp(-1, 1)
    tiny = torch.randn(50_000) * 1e-6  # the map's densest region, near zero
    edges = torch.cat([midpoints, codebook.values])
    nudged = torch.cat([torch.nextafter(edges, edges + 1), torch.nextafter(edges, edges - 1)])
    special = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1.1754944e-38, -1.1754944e-38, 0.99999994])
    # every bf16 value in [-1, 1] and both fp32 neighbours of it: the bucket boundaries
    bf16 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    bf16 = bf16[bf16.abs() <= 1]
    near = torch.cat([bf16, torch.nextafter(bf16, bf16 + 1), torch.nextafter(bf16, bf16 - 1)])
    z = torch.cat([uniform, gaussian, tiny, edges, nudged, special, near])
    z = z if signed else z.abs()
    assert torch.equal(codebook.nearest(z), torch.bucketize(z, midpoints).to(torch.uint8))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic8_picks_the_nearest_entry_and_matches_bitsandbytes(signed):
    import bitsandbytes.functional as F

    torch.manual_seed(0)
    x = torch.randn(8, 512)
    x = x if signed else x.square()
    codebook = dynamic_codebook(signed)
    qmap = codebook.values
    codes, absmax = quantize_dynamic8(x, codebook)
    assert codes.dtype == torch.uint8 and absmax.shape == (8, 2)
    y = dequantize_dynamic8(codes, absmax, codebook)
    # nearest map entry: no other entry of the block's map is closer
    z = x / absmax.repeat_interleave(256, dim=-1)
    best = (z.unsqueeze(-1) - qmap).abs().amin(dim=-1)
    assert torch.allclose((y / absmax.repeat_interleave(256, dim=-1) - z).abs(), best, atol=1e-6)
    # bitsandbytes' own blockwise quantizer on the same 256-element blocks: same values almost everywhere
    ref_codes, ref_state = F.quantize_blockwise(x.flatten(), code=F.create_dynamic_map(signed=signed), blocksize=256)
    y_ref = F.dequantize_blockwise(ref_codes, ref_state).view(8, 512)
    # bnb's CPU search does not always land on the nearest entry of the unsigned map (~3% of values here
    # go to a neighbour); ours does, so we agree almost everywhere and are never further from x.
    agree = (y - y_ref).abs() <= 1e-6 * x.abs().amax()
    assert agree.float().mean() > (0.99 if signed else 0.95)
    assert ((y - x).abs() <= (y_ref - x).abs() + 1e-6).all()


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes_map_bit_for_bit(signed):
    """The package's copy of the dynamic map (no bitsandbytes at run time) equals bitsandbytes' own."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    from muonq_hf.codecs import dynamic_map

    ours, theirs = dynamic_map(signed), bnb.create_dynamic_map(signed=signed)
    assert ours.dtype == theirs.dtype and torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
