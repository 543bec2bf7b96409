PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint train bench lab clean

# torch==2.13.0 first: a bare `torch` requirement in a fresh venv would pull a multi-GB CUDA build.
install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"

test:
	$(BIN)/python -m pytest -q tests

lint:
	$(BIN)/ruff check muonq_hf fplab muonq_hf_autoregister.py setup.py tests examples benchmarks

train:
	$(BIN)/python examples/run_clm.py --optim muonq --output_dir runs/train_muonq \
		--model_type gpt2 --n_layer 4 --n_embd 128 --n_head 4 --block_size 128 \
		--max_steps 300 --per_device_train_batch_size 16 --learning_rate 0.02 \
		--warmup_steps 20 --lr_scheduler_type cosine --eval_strategy steps --eval_steps 100 \
		--logging_steps 25 --save_strategy no --use_cpu --report_to none --overwrite_output_dir

bench:
	$(BIN)/python -m benchmarks all

lab:
	$(BIN)/python -m fplab all --out docs/fp_quantization

clean:
	rm -rf $(VENV) runs build *.egg-info
