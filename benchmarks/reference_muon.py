"""A tiny reference Muon whose momentum buffer is stored in bf16 (the "Muon bf16" benchmark row).

Not a MuonQ option: MuonQ stores its momentum as fp32 (bits=32) or as 4/8-bit codes. This class reuses
MuonQ for everything except the Muon-group step (so the AdamW part and the param-group routing are the
same as in the other rows) and the package's one Newton-Schulz (``zeropower_via_newtonschulz5``).
"""

from __future__ import annotations

import torch

from muonq_hf.matrices import plan_of
from muonq_hf.momentum import apply_update, orthogonalized_update
from muonq_hf.optimizer import MuonQ


class MuonBF16(MuonQ):
    """Plain Muon (docs/design.md, "Plain Muon") with ``momentum_buffer`` kept in bf16; AdamW groups as in MuonQ."""

    def _muon_step(self, p: torch.Tensor, group: dict, index: int) -> None:
        plan = plan_of(p, group)
        G = plan.view(p.grad.float())  # (E, m, n)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(G.shape, dtype=torch.bfloat16, device=p.device)
        M = group["momentum"] * state["momentum_buffer"].float() + G  # fp32 arithmetic
        state["momentum_buffer"].copy_(M)  # rounded to bf16 on storage
        U_in = G + group["momentum"] * M if group["nesterov"] else M
        apply_update(p, orthogonalized_update(plan, U_in, group["ns_steps"]), group["lr"], group["weight_decay"])
