"""An offline language-modelling corpus: Python's own documentation and standard library sources.

Everything here is deterministic for a given Python version (the corpus is that interpreter's
``pydoc_data.topics`` and stdlib) and needs no network. Nothing is cached unless a ``cache_dir`` is given.

    data = load_corpus_datasets(block_size=128, vocab_size=4096)
    data.train, data.eval        # datasets.Dataset with "input_ids" and "labels", each a block of block_size
    data.tokenizer               # a fast byte-level BPE tokenizer trained on the train documents

The pieces are public for scripts with their own data: :func:`train_bpe_tokenizer` and :func:`group_texts`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_CHARS = 3_000_000  # about 1M tokens at vocab 4096: 300 steps of 16 x 128 see ~60% of it
DEFAULT_EVAL_EVERY = 20  # every 20th document (5%) goes to the eval split
_SKIP_DIRS = {"test", "tests", "site-packages", "dist-packages", "__pycache__", "idle_test"}


def corpus_documents(max_chars: int | None = DEFAULT_MAX_CHARS) -> list[str]:
    """The corpus as a list of documents, in a fixed order.

    First every ``pydoc_data.topics`` entry (the text of the language reference, ~0.46 MB, sorted by topic),
    then the standard library's ``.py`` files sorted by relative path (test suites and site-packages left
    out), whole files only, until ``max_chars`` characters (None: all of them, ~25 MB).
    """
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    total = sum(len(d) for d in docs)
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources(root):
        if max_chars is not None and total >= max_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")  # a few stdlib files hold latin-1 bytes
        docs.append(text)
        total += len(text)
    return docs


def _stdlib_sources(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def split_documents(docs: Sequence[str], eval_every: int = DEFAULT_EVAL_EVERY) -> tuple[list[str], list[str]]:
    """(train, eval): every ``eval_every``-th document (starting with the 10th) is held out."""
    if eval_every < 2:
        raise ValueError(f"eval_every must be >= 2 (one document in eval_every goes to eval), got {eval_every}")
    offset = min(9, eval_every - 1)
    train = [d for i, d in enumerate(docs) if i % eval_every != offset]
    held_out = [d for i, d in enumerate(docs) if i % eval_every == offset]
    return train, held_out


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Any:
    """A byte-level BPE tokenizer (GPT-2 style, 256 byte symbols + merges + ``<|endoftext|>``) trained on texts.

    Returns a ``transformers`` fast tokenizer whose eos, bos and pad token are ``<|endoftext|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 258:
        raise ValueError(f"vocab_size must be >= 258 (256 bytes, <|endoftext|>, one merge), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN, pad_token=EOS_TOKEN, unk_token=None
    )


def group_texts(texts: Sequence[str], tokenizer: Any, block_size: int, batch_size: int = 256) -> Any:
    """Tokenize texts (an eos after each), concatenate and cut into blocks of ``block_size`` tokens.

    Returns a ``datasets.Dataset`` with ``input_ids`` and ``labels`` (a copy: the model shifts them), like
    the HF ``run_clm`` example; the last partial block is dropped. Raises if not one block fits.
    """
    from datasets import Dataset

    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    eos = tokenizer.eos_token_id
    pieces = []
    for start in range(0, len(texts), batch_size):
        for ids in tokenizer(list(texts[start : start + batch_size]), add_special_tokens=False)["input_ids"]:
            pieces.append(np.asarray(ids + [eos], dtype=np.int32))
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one block of block_size={block_size}")
    blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)  # (n_blocks, block_size)
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks.copy()})


@dataclass
class CorpusData:
    """Tokenized, grouped train and eval splits of the corpus, and the tokenizer that made them."""

    train: Any  # datasets.Dataset: input_ids, labels (block_size int32 each)
    eval: Any
    tokenizer: Any  # transformers PreTrainedTokenizerFast


def load_corpus_datasets(
    block_size: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    max_chars: int | None = DEFAULT_MAX_CHARS,
    eval_every: int = DEFAULT_EVAL_EVERY,
    cache_dir: str | os.PathLike | None = None,
) -> CorpusData:
    """The embedded corpus, split by document, BPE-tokenized (tokenizer trained on train docs), in blocks.

    With ``cache_dir`` the tokenizer and both splits are saved under ``cache_dir/muonq_corpus-<key>`` (key: the
    arguments and the Python version) and loaded from there next time; without it nothing is written.
    """
    if cache_dir is not None:
        key = json.dumps([block_size, vocab_size, max_chars, eval_every, sys.version, 1])
        path = Path(cache_dir) / f"muonq_corpus-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        if (path / "done").exists():
            return _load_cached(path)
    train_docs, eval_docs = split_documents(corpus_documents(max_chars), eval_every)
    tokenizer = train_bpe_tokenizer(train_docs, vocab_size)
    data = CorpusData(
        group_texts(train_docs, tokenizer, block_size), group_texts(eval_docs, tokenizer, block_size), tokenizer
    )
    if cache_dir is not None:
        data.tokenizer.save_pretrained(path / "tokenizer")
        data.train.save_to_disk(str(path / "train"))
        data.eval.save_to_disk(str(path / "eval"))
        (path / "done").touch()
    return data


def _load_cached(path: Path) -> CorpusData:
    from datasets import load_from_disk
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(path / "tokenizer")
    return CorpusData(load_from_disk(str(path / "train")), load_from_disk(str(path / "eval")), tokenizer)
