"""MuonQ inside the HF Trainer (one CPU process): runner, resume, checkpoint size, accumulation, bf16/clip/schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_hf import TinyDataset, state_digest, tiny_model, train_tiny
from transformers import Trainer, TrainingArguments

import muonq_hf  # noqa: F401  (registers --optim muonq)
from muonq_hf import MuonQ
from muonq_hf import momentum as momentum_module
from muonq_hf.matrices import plan_of

SCRIPTS = Path(__file__).parent / "scripts"

TF4_PATH = os.environ.get("MUONQ_HF_TF4_PATH")  # a `pip install --target` of transformers 4.57 (README)
FULL_PRECISION_MUON = "bits=32,normalize=False,rank_divisor=0,mu=0"


def _args(out: Path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out), use_cpu=True, report_to="none", optim="muonq", learning_rate=0.01, max_steps=4,
        per_device_train_batch_size=4, save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
    )
    return TrainingArguments(**{**base, **kw})


def _inner(trainer: Trainer) -> torch.optim.Optimizer:
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # Accelerate wraps the optimizer


def test_runner_runs_an_unmodified_script(tmp_path):
    """The script never imports muonq_hf: under the console script it trains with MuonQ, alone it cannot parse."""
    runner = Path(sys.executable).with_name("muonq-hf-run")
    assert runner.exists(), "console script muonq-hf-run missing: reinstall the package (pip install -e .)"
    flags = ["--output_dir", str(tmp_path), "--optim", "muonq", "--optim_args", "bits=4,adamw_bits=8", "--use_cpu",
             "--report_to", "none", "--max_steps", "2", "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run([str(runner), str(SCRIPTS / "tiny_hf.py"), *flags], capture_output=True, text=True, env=env,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["optimizer"] == "MuonQ" and result["steps"] == 2
    bare = subprocess.run([sys.executable, str(SCRIPTS / "tiny_hf.py"), *flags], capture_output=True, text=True,
                          env=env, timeout=300)
    assert bare.returncode == 2 and "invalid choice: 'muonq'" in bare.stderr, bare.stderr[-3000:]


def test_resume_is_bit_exact_and_checkpoint_holds_packed_codes(tmp_path):
    """Stop at step 2, resume into a differently initialised model, end bit-identical to the 4-step run."""
    args = _args(tmp_path, save_strategy="steps", save_steps=2, optim_args="stochastic_rounding=true")
    full = train_tiny(args, dropout=0.1)  # dropout: the Trainer must restore the RNG too
    weights = {k: v.clone() for k, v in full.model.state_dict().items()}
    resumed = train_tiny(args, dropout=0.1, resume=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    assert state_digest(_inner(resumed)) == state_digest(_inner(full))
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    c_fc = next(s for s in saved["state"].values() if "res_codes" in s and s["res_codes"].shape == (64, 128))
    assert c_fc["res_codes"].dtype == torch.uint8  # c_fc: Conv1D (64, 256) -> (64, 128) bytes, two codes each
    assert c_fc["P_codes"].dtype == torch.uint8 and c_fc["R_codes"].dtype == torch.uint8


def _muon_state_bytes(saved: dict) -> int:
    total = 0
    for group in saved["param_groups"]:
        if group["use_muon"]:
            for index in group["params"]:
                total += sum(v.numel() * v.element_size() for v in saved["state"][index].values() if torch.is_tensor(v))
    return total


def test_checkpoint_optimizer_file_is_about_7x_smaller_than_full_precision_muon(tmp_path):
    """optimizer.pt after one Trainer step, MuonQ vs full-precision Muon (same 8-bit AdamW for the rest).

    A Muon-dominated model (n_embd 256, vocab 64) so that the file ratio shows the Muon state's ratio; the
    AdamW share (embeddings, norms, biases) pulls the ratio of a real model's whole file down (see README).
    """
    sizes, muon_bytes = {}, {}
    for name, optim_args in (("muonq", "adamw_bits=8"), ("muon32", FULL_PRECISION_MUON + ",adamw_bits=8")):
        out = tmp_path / name
        args = _args(out, max_steps=1, save_strategy="steps", save_steps=1, optim_args=optim_args)
        Trainer(model=tiny_model(n_embd=256, vocab=64), args=args, train_dataset=TinyDataset(vocab=64)).train()
        path = out / "checkpoint-1" / "optimizer.pt"
        sizes[name], muon_bytes[name] = path.stat().st_size, _muon_state_bytes(torch.load(path, weights_only=True))
    # Muon part: fp32 (4 bytes/element) vs 4-bit codes (0.5) for the residual plus r (m + n) / 2 bytes of factors
    # (r = 256 / 16 = 16) and fp16 scales: 8 / (1 + r (m + n) / (m n)) = 7.1x for 256x256 pieces, 7.4x for 256x1024.
    muon_ratio = muon_bytes["muon32"] / muon_bytes["muonq"]
    file_ratio = sizes["muon32"] / sizes["muonq"]
    print(f"optimizer.pt: muonq {sizes['muonq']} B, full-precision Muon {sizes['muon32']} B; "
          f"Muon state ratio {muon_ratio:.2f}, file ratio {file_ratio:.2f}")
    assert 6.8 < muon_ratio < 7.5, muon_ratio
    assert 6.0 < file_ratio < muon_ratio, (file_ratio, sizes)


def test_gradient_accumulation_matches_the_double_batch_with_one_ns_per_step(tmp_path, monkeypatch):
    calls = []
    real_ns = momentum_module.zeropower_via_newtonschulz5

    def counting_ns(X, *a, **kw):
        calls.extend([tuple(X.shape[-2:])] * X.shape[0])  # one entry per matrix (a shape group is one call)
        return real_ns(X, *a, **kw)

    monkeypatch.setattr(momentum_module, "zeropower_via_newtonschulz5", counting_ns)
    results = {}
    for bits in (32, 4):
        for bs, accumulation in ((8, 1), (4, 2)):
            calls.clear()
            args = _args(tmp_path / f"{bits}-{bs}", max_steps=3, per_device_train_batch_size=bs,
                         gradient_accumulation_steps=accumulation, optim_args=f"bits={bits},ns_dtype=fp32")
            trainer = train_tiny(args, dropout=0.0)
            n_muon = sum(count for g in _inner(trainer).param_groups if g["use_muon"] for p in g["params"]
                         for count, _, _ in plan_of(p, g).matrices())  # Muon matrices (q, k, v pieces: 3 each)
            assert len(calls) == 3 * n_muon, (len(calls), n_muon)  # one NS per matrix per optimizer step
            results[bits, accumulation] = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    for bits, tol in ((32, 1e-5), (4, 2e-3)):
        diff = (results[bits, 1] - results[bits, 2]).abs().max().item()
        # fp32 summation order of the two half-batch gradients is the only difference; 4-bit codes sit on a
        # grid, so one rounding boundary crossed moves an element by one code step (x lr): whether one is crossed
        # depends on the CPU's summation order (< 1e-4 on an AVX-512 machine, 7.4e-4 on an AVX2 one), below
        # the 4-bit vs fp32 difference asserted after the loop.
        print(f"accumulation vs double batch, bits={bits}: max |diff| = {diff:.2e}")
        assert diff < tol, (bits, diff)
    codecs = (results[4, 1] - results[32, 1]).abs().max().item()
    assert codecs > 2e-3, codecs  # the two codecs differ by more than the 4-bit tolerance (the test can fail)


def test_bf16_clipping_schedule_and_separate_adamw_lr(tmp_path, monkeypatch):
    seen = []
    real_step = MuonQ.step

    def recording_step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append((torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(),
                     [(g["use_muon"], g["lr"], g["initial_lr"]) for g in self.param_groups]))
        return real_step(self, closure)

    monkeypatch.setattr(MuonQ, "step", recording_step)
    args = _args(tmp_path, bf16=True, max_grad_norm=0.05, lr_scheduler_type="linear", warmup_steps=1,
                 max_steps=3, optim_args="adamw_lr=0.002")
    trainer = Trainer(model=tiny_model(), args=args, train_dataset=TinyDataset())
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    assert len(seen) == 3
    for norm, groups in seen:
        assert norm <= 0.05 * (1 + 1e-3)  # clipped before the optimizer sees the gradients
        assert {round(initial, 6) for muon, _, initial in groups if not muon} == {0.002}
        assert {round(initial, 6) for muon, _, initial in groups if muon} == {0.01}
        factors = {round(lr / initial, 6) for _, lr, initial in groups}
        assert len(factors) == 1  # one schedule factor for every group
    # linear schedule, 1 warmup step, 3 steps: factors 0 (warmup start), 1, 0.5 at the three optimizer steps
    assert [round(groups[0][1] / groups[0][2], 6) for _, groups in seen] == [0.0, 1.0, 0.5]
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("bad", ["momentum=1.5", "nonfinite=maybe"])
def test_invalid_option_values_stop_training_with_the_allowed_values(tmp_path, bad):
    trainer = Trainer(model=tiny_model(), args=_args(tmp_path, optim_args=bad), train_dataset=TinyDataset())
    allowed = r"momentum=1.5 is not allowed; momentum must be a finite number in \[0, 1\)|nonfinite must"
    with pytest.raises(ValueError, match=allowed):
        trainer.train()


@pytest.mark.skipif(not TF4_PATH, reason="set MUONQ_HF_TF4_PATH to a --target install of transformers 4.57.x")
def test_transformers_4x_path_trains_and_resumes_bit_exactly(tmp_path):
    """The real 4.x Trainer (no handler table): the wrapped get_optimizer_cls_and_kwargs builds MuonQ."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": TF4_PATH}
    cmd = [sys.executable, "-m", "muonq_hf.run", str(SCRIPTS / "tiny_hf.py"), "--output_dir", str(tmp_path),
           "--optim", "muonq", "--use_cpu", "--report_to", "none", "--max_steps", "4", "--save_steps", "2",
           "--per_device_train_batch_size", "4", "--resume_check", "--disable_tqdm", "true"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["transformers"].startswith("4.") and result["optimizer"] == "MuonQ"
    assert result["resume_exact"] and result["resume_digest_equal"]
