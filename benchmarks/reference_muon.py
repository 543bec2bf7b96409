"""A tiny reference Muon whose momentum buffer is stored in bf16 (the "Muon bf16" benchmark row).

Not a MuonQ option: MuonQ stores its momentum as fp32 (bits=32) or as 4/8-bit codes. This class reuses
MuonQ for everything except the Muon-group step (so the AdamW part and the param-group routing are the
same as in the other rows) and the package's one Newton-Schulz (``zeropower_via_newtonschulz5``).
"""

from __future__ import annotations

import torch

from muonq_hf.optimizer import MuonQ, layout_of
from muonq_hf.orthogonalize import muon_scale, zeropower_via_newtonschulz5


class MuonBF16(MuonQ):
    """Plain Muon (SPEC section 2) with ``momentum_buffer`` kept in bf16; AdamW groups as in MuonQ."""

    def _muon_step(self, p: torch.Tensor, group: dict, index: int) -> None:
        layout = layout_of(p, group)
        G = layout.to_pieces(p.grad.reshape(layout.m, layout.n).float())  # (k, mp, np)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(layout.m, layout.n, dtype=torch.bfloat16, device=p.device)
        M = group["momentum"] * layout.to_pieces(state["momentum_buffer"]).float() + G  # fp32 arithmetic
        state["momentum_buffer"].copy_(layout.to_rows(M))  # rounded to bf16 on storage
        U_in = G + group["momentum"] * M if group["nesterov"] else M
        U = zeropower_via_newtonschulz5(U_in, group["ns_steps"]).float()  # (k, mp, np)
        mp, np_ = layout.piece_shape
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(layout.to_rows(U).reshape(p.shape).to(p.dtype), alpha=-group["lr"] * muon_scale(mp, np_))
