"""A tiny reference Muon whose momentum buffer is stored in bf16 (the "Muon bf16" benchmark row).

Not a MuonQ option: MuonQ stores its momentum as fp32 (bits=32) or as 4/8-bit codes. This class replaces only
MuonQ's momentum stage (``MuonQ.momentum_stage``), so the orthogonalize and apply stages, the AdamW part and
the param-group routing are the same as in the other rows.
"""

from __future__ import annotations

from typing import Any

import torch

from muonq_hf.matrices import MatrixPlan
from muonq_hf.optimizer import MuonQ


class MuonBF16(MuonQ):
    """Plain Muon (docs/design.md, "Plain Muon") with ``momentum_buffer`` kept in bf16; AdamW groups as in MuonQ."""

    def momentum_stage(
        self, plan: MatrixPlan, G: torch.Tensor, state: dict, group: dict, index: int, **rows: Any
    ) -> torch.Tensor:
        if rows:
            raise NotImplementedError(f"MuonBF16 runs on whole matrices only, got {sorted(rows)} (FSDP2 row shards)")
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(G.shape, dtype=torch.bfloat16, device=G.device)  # (E, m, n)
        M = group["momentum"] * state["momentum_buffer"].float() + G  # fp32 arithmetic
        state["momentum_buffer"].copy_(M)  # rounded to bf16 on storage
        return G + group["momentum"] * M if group["nesterov"] else M
