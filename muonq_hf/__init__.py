"""muonq_hf: MuonQ, Muon with a 4-bit momentum, as a first-class optimizer of the Hugging Face stack."""

from .grouping import param_groups
from .hf import register
from .memory import state_bytes
from .optimizer import MuonQ
from .orthogonalize import zeropower_via_newtonschulz5

__all__ = ["MuonQ", "param_groups", "register", "state_bytes", "zeropower_via_newtonschulz5"]
__version__ = "0.1.0"

register()  # `import muonq_hf` makes `--optim muonq` available to TrainingArguments and Trainer
