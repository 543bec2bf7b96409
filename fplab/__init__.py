"""fplab: the floating-point quantization lab (arXiv 2510.21314), Adam vs Muon with G, W, M, V in simulated
float formats (docs/fp_quantization.md). A separate package from the optimizer: it needs scikit-learn and
matplotlib (``pip install ".[lab]"``) and uses only muonq_hf's Newton-Schulz. Run it: ``python -m fplab``."""
