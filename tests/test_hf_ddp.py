"""2-rank DDP on CPU (gloo) through torchrun and the runner: train, save, resume bit-exactly, same state on ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "tiny_hf.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_ddp_trains_saves_and_resumes_bit_exactly(tmp_path):
    """`torchrun -m muonq_hf.run` gives every worker the registration; the script never imports muonq_hf."""
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m", "muonq_hf.run", str(SCRIPT),
        "--output_dir", str(tmp_path), "--optim", "muonq", "--use_cpu", "--report_to", "none", "--max_steps", "4",
        "--save_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "0.01", "--resume_check",
        "--disable_tqdm", "true",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert result["optimizer"] == "MuonQ" and result["steps"] == 4
    assert result["resume_exact"], "weights after resume differ from the uninterrupted run"
    assert result["resume_digest_equal"], "optimizer state after resume differs from the uninterrupted run"
    assert result["rank_digests"] == [result["digest"]] * 2, "quantized state differs between ranks"
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert any(s.get("res_codes", torch.empty(0)).dtype == torch.uint8 for s in saved["state"].values())
