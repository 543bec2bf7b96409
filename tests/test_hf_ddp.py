"""2-rank DDP on CPU (gloo) through torchrun and the runner: train, save, resume bit-exactly, same state on ranks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from launch import torchrun_two

SCRIPT = Path(__file__).parent / "scripts" / "tiny_hf.py"


def test_torchrun_ddp_trains_saves_and_resumes_bit_exactly(tmp_path):
    """`torchrun -m muonq_hf.run` gives every worker the registration; the script never imports muonq_hf."""
    torchrun_two(
        "-m", "muonq_hf.run", str(SCRIPT),
        "--output_dir", str(tmp_path), "--optim", "muonq", "--use_cpu", "--report_to", "none", "--max_steps", "4",
        "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--resume_check",
        "--disable_tqdm", "true",
        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=400,
    )  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert result["optimizer"] == "MuonQ" and result["steps"] == 4
    assert result["resume_exact"], "weights after resume differ from the uninterrupted run"
    assert result["resume_digest_equal"], "optimizer state after resume differs from the uninterrupted run"
    assert result["rank_digests"] == [result["digest"]] * 2, "quantized state differs between ranks"
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert any(s.get("res_codes", torch.empty(0)).dtype == torch.uint8 for s in saved["state"].values())
