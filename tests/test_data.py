"""The embedded corpus (pydoc topics + stdlib sources), the on-the-fly byte-level BPE and block grouping."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np
import pytest
from corpus import (
    EOS_TOKEN,
    corpus_documents,
    group_texts,
    load_corpus_datasets,
    split_documents,
    train_bpe_tokenizer,
)

MAX_CHARS = 600_000  # all pydoc topics (~0.46 MB) and the first stdlib sources


def test_corpus_is_pydoc_topics_then_stdlib_sources_in_a_fixed_order():
    docs = corpus_documents(MAX_CHARS)
    assert docs == corpus_documents(MAX_CHARS)
    names = sorted(topics)
    assert docs[: len(names)] == [topics[n] for n in names]
    sources = docs[len(names) :]
    assert sources and all("import " in s or "def " in s or '"""' in s for s in sources)
    total = sum(map(len, docs))
    assert MAX_CHARS <= total < MAX_CHARS + max(map(len, sources))  # stops after the file that crosses the cap
    assert len(corpus_documents(1000)) == len(names)  # the cap never cuts the documentation


def test_split_is_by_document_and_disjoint():
    docs = [f"doc {i}" for i in range(100)]
    train, held_out = split_documents(docs, eval_every=20)
    assert held_out == ["doc 9", "doc 29", "doc 49", "doc 69", "doc 89"]
    assert sorted(train + held_out) == sorted(docs)
    with pytest.raises(ValueError, match="eval_every must be >= 2.*got 1"):
        split_documents(docs, eval_every=1)


def test_bpe_is_byte_level_lossless_with_the_requested_vocab():
    texts = corpus_documents(MAX_CHARS)
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    assert len(tokenizer) == 512 and tokenizer.eos_token == EOS_TOKEN == tokenizer.pad_token
    sample = "def f(x):\n    return x ** 2  # ünïcödé ✓ 数学\n"  # characters absent from training still encode
    assert tokenizer.decode(tokenizer(sample)["input_ids"]) == sample
    with pytest.raises(ValueError, match="vocab_size must be >= 258.*got 100"):
        train_bpe_tokenizer(texts[:3], vocab_size=100)


def test_datasets_are_deterministic_grouped_blocks_and_cache_round_trips(tmp_path):
    data = load_corpus_datasets(block_size=64, vocab_size=512, max_chars=MAX_CHARS)
    assert data.train.column_names == ["input_ids", "labels"] and len(data.eval) > 10
    train = np.array(data.train["input_ids"])  # (n_blocks, 64)
    assert train.shape[1] == 64 and train.max() < 512 and train.min() >= 0
    assert np.array_equal(train, np.array(data.train["labels"]))  # the model shifts labels itself
    eos = data.tokenizer.eos_token_id
    assert (train == eos).sum() > 10  # documents are separated by <|endoftext|>
    # a document of the eval split decodes back from the start of the eval stream
    first_eval_doc = split_documents(corpus_documents(MAX_CHARS))[1][0]
    assert data.tokenizer.decode(data.eval[0]["input_ids"]) == first_eval_doc[: len(data.tokenizer.decode(
        data.eval[0]["input_ids"]))]
    cached = load_corpus_datasets(block_size=64, vocab_size=512, max_chars=MAX_CHARS, cache_dir=tmp_path)
    assert np.array_equal(np.array(cached.train["input_ids"]), train)  # deterministic: same blocks again
    assert cached.tokenizer.get_vocab() == data.tokenizer.get_vocab()
    (entry,) = tmp_path.iterdir()
    assert (entry / "done").exists()
    again = load_corpus_datasets(block_size=64, vocab_size=512, max_chars=MAX_CHARS, cache_dir=tmp_path)
    assert np.array_equal(np.array(again.eval["input_ids"]), np.array(data.eval["input_ids"]))


def test_group_texts_cuts_the_stream_and_rejects_too_little_text():
    tokenizer = train_bpe_tokenizer(corpus_documents(1000)[:20], vocab_size=300)
    texts = ["abc def", "ghi"]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    stream = sum(ids, [])
    blocks = group_texts(texts, tokenizer, block_size=2)
    assert np.array(blocks["input_ids"]).ravel().tolist() == stream[: len(stream) // 2 * 2]
    with pytest.raises(ValueError, match=f"hold {len(stream)} tokens, fewer than one block of block_size=1000"):
        group_texts(texts, tokenizer, block_size=1000)
    with pytest.raises(ValueError, match="block_size must be >= 2, got 1"):
        group_texts(texts, tokenizer, block_size=1)
