"""--optim muonq in fresh interpreters: the opt-in MUONQ_HF_REGISTER switch (site-packages .pth) and trl's CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = {k: v for k, v in os.environ.items() if k != "MUONQ_HF_REGISTER"}
CHECK = (
    "import sys; at_start = 'muonq_hf' in sys.modules; "
    "from transformers import TrainingArguments; from transformers.training_args import OptimizerNames; "
    "print(at_start, 'muonq' in OptimizerNames._value2member_map_)"
)


def python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_switch_registers_in_a_fresh_interpreter_only_when_set_and_lazily():
    off = python(CHECK, ENV)
    assert off.returncode == 0 and off.stdout.split() == ["False", "False"], off.stderr[-2000:]
    on = python(CHECK, {**ENV, "MUONQ_HF_REGISTER": "1"})
    # nothing imported at start-up (not even muonq_hf): registered once transformers is imported
    assert on.returncode == 0 and on.stdout.split() == ["False", "True"], on.stderr[-2000:]


def test_switch_never_breaks_the_interpreter():
    # `sys.modules[name] = None` makes `import muonq_hf` fail, as a broken install would
    code = "import sys; sys.modules['muonq_hf'] = None; import transformers.training_args; print('alive')"
    out = python(code, {**ENV, "MUONQ_HF_REGISTER": "1"})
    assert out.returncode == 0 and "alive" in out.stdout, out.stderr[-2000:]
    assert "registering --optim muonq failed: ModuleNotFoundError" in out.stderr, out.stderr[-2000:]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny Llama and a BPE tokenizer saved locally, and a JSON-lines text dataset (Python's docs)."""
    import pydoc_data.topics

    from corpus import train_bpe_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("trl")
    texts = list(pydoc_data.topics.topics.values())[:40]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    tok.save_pretrained(root / "model")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    (root / "data").mkdir()
    with open(root / "data" / "train.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text[:300]}) + "\n")
    return root


def trl_sft(root: Path, env: dict, out: str) -> subprocess.CompletedProcess:
    trl = Path(sys.executable).parent / "trl"
    cmd = [str(trl), "sft", "--model_name_or_path", str(root / "model"), "--dataset_name", str(root / "data"),
           "--output_dir", str(root / out), "--optim", "muonq", "--optim_args", "bits=4", "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--max_length", "64", "--use_cpu", "--report_to", "none",
           "--save_strategy", "steps", "--save_steps", "2", "--log_level", "info"]
    return subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)


def test_trl_sft_trains_with_muonq_through_the_switch(local_model):
    pytest.importorskip("trl")
    refused = trl_sft(local_model, ENV, "off")  # trl's CLI re-launches a fresh interpreter: no muonq there
    assert refused.returncode != 0 and "muonq" in refused.stderr, refused.stderr[-3000:]
    done = trl_sft(local_model, {**ENV, "MUONQ_HF_REGISTER": "1"}, "on")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "MuonQ routing: Muon" in done.stderr + done.stdout  # the Trainer's info log names the split
    state = torch.load(local_model / "on" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    muon = [g for g in state["param_groups"] if g["use_muon"]]
    assert muon and all(g["bits"] == 4 for g in muon)  # --optim_args reached MuonQ
    codes = [s["res_codes"] for s in state["state"].values() if "res_codes" in s]
    assert codes and all(c.dtype == torch.uint8 for c in codes)  # the packed 4-bit momentum: MuonQ trained


def test_the_package_does_not_import_bitsandbytes():
    """The 8-bit AdamW codec carries its own copy of the dynamic map: bitsandbytes is a dev/benchmark extra."""
    code = ("import sys, torch, muonq_hf; from muonq_hf.codecs import dynamic_codebook; dynamic_codebook(True); "
            "p = torch.nn.Parameter(torch.randn(64, 64)); p.grad = torch.randn(64, 64); "
            "muonq_hf.MuonQ([dict(params=[p], use_muon=False)], adamw_bits=8).step(); "
            "print('bitsandbytes' in sys.modules)")
    out = python(code, ENV)
    assert out.returncode == 0 and out.stdout.split() == ["False"], out.stderr[-2000:]
