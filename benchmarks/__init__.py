"""Benchmarks and quality study of MuonQ against AdamW, bitsandbytes AdamW8bit, Muon and naive 4-bit Muon.

``python -m benchmarks memory|speed|quality|report|all`` (see ``benchmarks/__main__.py``); results land in
``benchmarks/results/*.json`` and ``benchmarks/RESULTS.md``.
"""
