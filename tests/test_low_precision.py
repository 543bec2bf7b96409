"""Low-precision weights (``weight_update``, muonq_hf.weights): bf16 / fp16 weights without an fp32 master copy keep
their updates by stochastic rounding or a Kahan-compensated add; the noise is keyed by each element's place in its
parameter, so resumes and shards draw what one uninterrupted process draws."""

import io
import re
from pydoc_data.topics import topics

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from muonq_hf import MuonQ, param_groups, state_bytes
from muonq_hf.backends import Task
from muonq_hf.backends.common import muon_groups
from muonq_hf.graphs import GraphRefused, check_recordable
from muonq_hf.hf import parse_optim_args
from muonq_hf.kernels import set_compile
from muonq_hf.keyed import key_of
from muonq_hf.memory import expected_state_bytes
from muonq_hf.weights import KAHAN, Place, _stochastic_add_bf16, _stochastic_add_eager, noise_bits, stochastic_round


# ------------------------------------------------------------------------------------------ the two adds
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased_and_keeps_exact_values(dtype):
    """x between two neighbours of the dtype rounds to the farther one with probability |x - nearest| / gap: the
    mean of 2^16 draws lands within 4 standard errors of x; a representable x never moves; past the range, inf."""
    low = torch.tensor(1.0, dtype=dtype)
    gap = float(torch.nextafter(low, torch.tensor(2.0, dtype=dtype))) - 1.0
    n = 1 << 16
    noise = noise_bits((n,), key_of(0, 1), Place(), torch.device("cpu"))
    for fraction in (0.05, 0.3, 0.5, 0.8):
        x = torch.full((n,), 1.0 + fraction * gap)
        rounded = stochastic_round(x, noise, dtype).float()
        assert set(rounded.unique().tolist()) <= {1.0, 1.0 + gap}
        sigma = gap * (fraction * (1 - fraction) / n) ** 0.5
        mean_error = float(rounded.double().mean()) - (1.0 + fraction * gap)
        assert abs(mean_error) < 4 * sigma, f"fraction {fraction}: mean off {mean_error:.2g}, 4 sigma {4 * sigma:.2g}"
    exact = torch.tensor([0.0, -3.0, 1.5, 2.0**-10])
    assert torch.equal(stochastic_round(exact, noise[:4], dtype).float(), exact)
    assert torch.equal(stochastic_round(torch.tensor([1e39]), noise[:1], dtype), torch.tensor([1e39]).to(dtype))


def test_the_noise_of_a_block_is_the_whole_parameters_noise_at_its_place():
    """A shard or chunk (rows 3..7 and columns 2..5 of a 10 x 6 parameter) draws the numbers the whole parameter
    draws there: ranks and chunks agree with one process. The draws are uniform in [0, 2^16): mean 2^15."""
    key, cpu = key_of(7, 3, 11, 4), torch.device("cpu")
    whole = noise_bits((10, 6), key, Place(), cpu)
    assert torch.equal(noise_bits((4, 3), key, Place(3, 2, 6), cpu), whole[3:7, 2:5])
    assert torch.equal(noise_bits((4, 6), key, Place(3), cpu), whole[3:7])
    many = noise_bits((256, 1024), key, Place(), cpu).double() / 2**16
    assert float(many.min()) >= 0 and float(many.max()) < 1
    assert abs(float(many.mean()) - 0.5) < 4 * (1 / 12 / many.numel()) ** 0.5, float(many.mean())
    assert not torch.equal(noise_bits((10, 6), key_of(7, 3, 12, 4), Place(), cpu), whole)  # the next step differs


def test_the_compiled_stochastic_add_gives_the_eager_values_and_compiles_once():
    """The bf16 add is one compiled kernel whose values are the eager ones bit for bit, and a new step's key and a
    new place (ints) compile nothing again."""
    torch._dynamo.reset()
    set_compile(True)
    graphs = torch._dynamo.utils.counters["stats"]
    before = graphs["unique_graphs"]  # the counter is the process's: other tests compiled before this one
    try:
        weight = torch.randn(96, 160).to(torch.bfloat16)
        delta = torch.randn(96, 160) * 1e-3
        for step in range(3):
            args = (weight, delta, 5 * step, 0, 160, 12345 + step, 999 + 7 * step)
            assert torch.equal(_stochastic_add_bf16(*args), _stochastic_add_eager(*args)), step
        assert graphs["unique_graphs"] - before == 1, graphs["unique_graphs"] - before
    finally:
        set_compile(False)


@pytest.mark.parametrize("mode", ["kahan", "stochastic"])
def test_tiny_updates_accumulate_in_a_bf16_weight(mode):
    """200 AdamW steps of a constant gradient at lr 1e-4 move entries of 1.0 down by 0.02, each step 1/40 of a bf16
    ulp there (2^-8): round-to-nearest keeps 1.0. Kahan ends within one ulp of the fp32 run in every entry.
    Stochastic rounding is unbiased: the mean of the 4096 entries within 0.1 ulp of the fp32 run's (its standard
    error is 2.2 / 64 ulp: each entry walks sqrt(200 p (1 - p)) = 2.2 ulps, p = 1/40), every entry within 12 ulps."""
    ends = {}
    for update in ("nearest", mode, "fp32"):
        weight = nn.Parameter(torch.ones(64, 64, dtype=torch.float32 if update == "fp32" else torch.bfloat16))
        opt = MuonQ([dict(params=[weight], use_muon=False)], lr=1e-4, betas=(0.9, 0.95),
                    weight_update="nearest" if update == "fp32" else update)
        for _ in range(200):
            weight.grad = torch.ones_like(weight)
            opt.step()
        ends[update] = weight.detach().double()
    ulp = 2.0**-8
    assert torch.equal(ends["nearest"], torch.ones(64, 64).double()), "round to nearest should lose every step here"
    worst = float((ends[mode] - ends["fp32"]).abs().max()) / ulp
    mean = float((ends[mode] - ends["fp32"]).mean()) / ulp
    if mode == "kahan":
        assert worst <= 1, f"kahan: an entry is {worst:.2f} ulps from the fp32 run"
    else:
        assert abs(mean) < 0.1 and worst <= 12, f"stochastic: mean {mean:.3f} ulps, worst {worst:.2f} ulps off"


# --------------------------------------------------------------------------- a tiny GPT-2 on real text
def _corpus() -> torch.Tensor:
    return torch.tensor(list("\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64))


def _matrix_change(weight_update: str | None, steps: int = 50, **options) -> dict[str, torch.Tensor]:
    """The change of the Muon and of the AdamW tensors over ``steps`` at lr 1e-4 of a tiny GPT-2 whose weights are
    kept in bf16 (``weight_update``) or fp32 (None). The forward and backward run in fp32 on an fp32 copy of the
    weights, so the only difference between the runs is how the weights store their updates."""
    data, compute = _corpus(), _gpt2()
    stored = compute if weight_update is None else _gpt2().to(torch.bfloat16)
    opt = MuonQ(param_groups(stored), lr=1e-4, weight_update=weight_update or "nearest", **options)
    start = {id(p): p.detach().float().clone() for p in stored.parameters()}
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 65, (16,), generator=g)
        x = torch.stack([data[i : i + 64] for i in ix])
        if stored is not compute:
            with torch.no_grad():
                torch._foreach_copy_(list(compute.parameters()), list(stored.parameters()))
        compute(x, labels=x).loss.backward()
        if stored is not compute:
            for c, p in zip(compute.parameters(), stored.parameters(), strict=True):
                p.grad, c.grad = c.grad.to(p.dtype), None
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {kind: [p for g in opt.param_groups if g["use_muon"] == (kind == "muon") for p in g["params"]]
              for kind in ("muon", "adamw")}
    return {kind: torch.cat([(p.detach().float() - start[id(p)]).flatten() for p in ps]) for kind, ps in params.items()}


@pytest.fixture(scope="module")
def fp32_change():
    return _matrix_change(None)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_bf16_weights_keep_the_direction_of_the_fp32_run(fp32_change):
    """Measured (50 steps, lr 1e-4): cosine of the Muon matrices' change to the fp32 run's: nearest 0.78,
    stochastic 0.93, Kahan 0.99 (norm ratio 0.73 / 1.06 / 1.00). Kahan must reach 0.95 (the issue's bar),
    stochastic rounding must recover most of what nearest loses, and nearest must stay measurably worse (or
    the test would not tell the options apart)."""
    got = {mode: _matrix_change(mode) for mode in ("nearest", "stochastic", "kahan")}
    cos = {mode: _cosine(change["muon"], fp32_change["muon"]) for mode, change in got.items()}
    norm = {mode: float(change["muon"].norm() / fp32_change["muon"].norm()) for mode, change in got.items()}
    assert cos["kahan"] >= 0.95 and abs(norm["kahan"] - 1) < 0.05, (cos, norm)
    assert cos["stochastic"] >= 0.9 and abs(norm["stochastic"] - 1) < 0.1, (cos, norm)
    assert cos["nearest"] < 0.85 and norm["nearest"] < 0.8, (cos, norm)
    adamw = {mode: _cosine(change["adamw"], fp32_change["adamw"]) for mode, change in got.items()}
    assert adamw["kahan"] >= 0.99 and adamw["stochastic"] >= 0.97, adamw


def test_eight_bit_adamw_moments_with_kahan_weights(fp32_change):
    """The fused 8-bit AdamW step returns its change for a compensated add: the embeddings (8-bit moments, bf16
    weights) follow the fp32-weight run with 8-bit moments."""
    ref = _matrix_change(None, adamw_bits=8)
    got = _matrix_change("kahan", adamw_bits=8)
    assert _cosine(got["adamw"], ref["adamw"]) >= 0.99, _cosine(got["adamw"], ref["adamw"])


# ------------------------------------------------------------------------------- state, resume, groups
def _bf16_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8)).to(torch.bfloat16)


def _train(model: nn.Module, opt: MuonQ, steps: range) -> None:
    for step in steps:
        x = torch.randn(16, 32, generator=torch.Generator().manual_seed(step)).to(next(model.parameters()).dtype)
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["stochastic", "kahan"])
def test_resume_is_bit_exact_and_kahan_buffers_are_state(mode):
    """3 steps, a saved and reloaded state, 3 more: the weights and the state equal 6 uninterrupted steps bit for
    bit (the noise is keyed by the step, the Kahan buffers are checkpointed). With Kahan, every bf16 parameter has a
    bf16 buffer of its shape, counted as "compensation" in state_bytes and in the routing report's expected bytes."""
    model, lr = _bf16_model(), 0.003
    opt = MuonQ(param_groups(model), lr=lr, weight_update=mode, weight_decay=0.1)
    _train(model, opt, range(6))
    resumed = _bf16_model()
    opt2 = MuonQ(param_groups(resumed), lr=lr, weight_update=mode, weight_decay=0.1)
    _train(resumed, opt2, range(3))
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": opt2.state_dict()}, buffer)
    fresh = _bf16_model()
    opt3 = MuonQ(param_groups(fresh), lr=lr, weight_update=mode, weight_decay=0.1)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    fresh.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["optim"])
    _train(fresh, opt3, range(3, 6))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b), f"{name}: differs by up to {float((a.float() - b.float()).abs().max()):.3g}"
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        s, t = opt.state[p], opt3.state[q]
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s), sorted(s)
        assert (KAHAN in s) == (mode == "kahan")
        if mode == "kahan":
            assert s[KAHAN].dtype == torch.bfloat16 and s[KAHAN].shape == p.shape
    kahan_bytes = sum(2 * p.numel() for p in model.parameters()) if mode == "kahan" else 0
    counted = state_bytes(opt)
    assert counted["muon"]["compensation"] + counted["adamw"]["compensation"] == kahan_bytes, counted
    expected = sum(expected_state_bytes(tuple(p.shape), {**g, "params": None}, p.dtype)
                   for g in opt.param_groups for p in g["params"])
    assert expected == counted["total"], (expected, counted["total"])


def test_shape_groups_step_like_one_matrix_at_a_time():
    """Same-shape bf16 matrices stepped together (a shape group: one foreach op per operation) equal one-by-one
    steps bit for bit, with the Kahan buffers kept per matrix (not stacked into the group's momentum bank)."""
    ends = []
    for batch_elements in (None, 0):
        for mode in ("stochastic", "kahan"):
            model = _bf16_model()
            opt = MuonQ(param_groups(model), lr=0.003, weight_update=mode, batch_elements=batch_elements)
            _train(model, opt, range(4))
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            shapes = [len(batch) for batch in muon_groups(opt._tasks(), opt.state, batch_elements)]
            assert max(shapes) == (1 if batch_elements == 0 else 2), shapes  # the two 64 x 64 layers, or one by one
            ends.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(ends[:2], ends[2:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_switching_modes_mid_run_frees_or_starts_the_buffer():
    """weight_update edited in the groups: Kahan -> nearest frees the buffers at the next step; back to Kahan starts
    them at zero. Loading a checkpoint keeps the mode given now (like the storage options)."""
    model = _bf16_model()
    opt = MuonQ(param_groups(model), lr=0.003, weight_update="kahan")
    _train(model, opt, range(2))
    saved = opt.state_dict()
    for group in opt.param_groups:
        group["weight_update"] = "nearest"
    _train(model, opt, range(2, 3))
    assert not any(KAHAN in s for s in opt.state.values())
    for group in opt.param_groups:
        group["weight_update"] = "kahan"
    _train(model, opt, range(3, 4))
    assert all(KAHAN in opt.state[p] for p in model.parameters())
    other = MuonQ(param_groups(model), lr=0.003)  # nearest now: the checkpoint's buffers are dropped
    other.load_state_dict(saved)
    assert all(g["weight_update"] == "nearest" for g in other.param_groups)
    assert not any(KAHAN in s for s in other.state.values())


# ---------------------------------------------------------------------------------------------- refusals
def test_a_bad_mode_and_an_fp32_only_optimizer_are_refused_by_name():
    model = _bf16_model()
    with pytest.raises(ValueError, match=re.escape("weight_update='round' is not allowed; weight_update must be "
                                                   "'nearest', 'stochastic' or 'kahan'")):
        MuonQ(param_groups(model), weight_update="round")
    fp32 = _bf16_model().float()
    opt = MuonQ(param_groups(fp32), lr=0.01, weight_update="kahan")
    before = [p.detach().clone() for p in fp32.parameters()]
    with pytest.raises(ValueError, match=r"weight_update='kahan' keeps the changes of bf16 / fp16 weights, but every "
                                         r"parameter this optimizer steps is torch\.float32.*No state or weight"):
        _train(fp32, opt, range(1))
    assert all(torch.equal(a, b) for a, b in zip(before, fp32.parameters(), strict=True)) and not opt.state
    mixed = _bf16_model()
    mixed[7].float()  # an fp32 LayerNorm among bf16 weights: it takes torch's add, the bf16 ones the option
    opt = MuonQ(param_groups(mixed), lr=0.01, weight_update="kahan")
    _train(mixed, opt, range(1))
    assert KAHAN not in opt.state[mixed[7].weight] and KAHAN in opt.state[mixed[0].weight]


def test_a_cuda_graph_cannot_record_stochastic_weight_updates():
    weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
    weight.grad = torch.zeros_like(weight)
    group = MuonQ([dict(params=[weight], use_muon=True)], weight_update="stochastic").param_groups[0]
    with pytest.raises(GraphRefused, match="cannot record weight_update='stochastic'.*weight_update='kahan'"):
        check_recordable([Task(0, group, weight)], device_type="cpu")


def test_optim_args_takes_weight_update():
    assert parse_optim_args("weight_update=kahan,bits=4") == {"weight_update": "kahan", "bits": 4}


def test_stochastic_updates_of_a_parameter_past_two_to_the_32_elements_are_refused():
    """The noise counter of an element is its index in the parameter (< 2^32): a larger one is refused before the
    step, with the way out (on a meta tensor: no memory)."""
    huge = nn.Parameter(torch.empty(1 << 16, (1 << 16) + 1, dtype=torch.bfloat16, device="meta"))
    opt = MuonQ([dict(params=[huge], use_muon=False)], weight_update="stochastic")
    with pytest.raises(ValueError, match=r"at most 2\^32 per parameter; param group 0 has one of shape \(65536, "
                                         r"65537\): use weight_update='kahan'"):
        opt.step()
