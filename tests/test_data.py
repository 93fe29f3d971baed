"""Tests for moe_hooked.data: corpus loading, built-in corpora, streaming tokenisation."""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path

import pytest
import torch

from moe_hooked.data import (
    TokenBatch,
    builtin_corpora,
    count_tokens,
    iter_token_batches,
    iter_token_chunks,
    load_corpora,
    load_hf_dataset,
    load_texts,
)

REPO = Path(__file__).resolve().parents[1]
SHARED_DOMAINS = REPO.parent / "shared/data/domains"
PAD, BOS, EOS = 0, 1, 2

TRAIN_SENTENCES = [
    "The cat sat on the mat and looked at the moon.",
    "def add(a, b): return a + b",
    "Le chat dort sur le canapé.",
    "2 + 3 = 5 and 7 * 6 = 42.",
    "Routers send each token to a few experts.",
]

TEXTS = [
    "The cat sat on the mat.",
    "A much longer sample that has to be split into several chunks because it is long.",
    "",
    "Short one.",
    "Experts and routers: def f(x): return x * 2",
]


def _train_tokenizer(**special):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tokenizer():
    tok = _train_tokenizer(pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD, BOS, EOS)
    return tok


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def _rows(batches):
    """Real (unpadded) token rows of all batches, as lists."""
    return [
        row[mask.bool()].tolist() for b in batches for row, mask in zip(b.tokens, b.attention_mask)
    ]


# ---------------------------------------------------------------------------------------------
# Tokenisation
# ---------------------------------------------------------------------------------------------


def test_chunks_keep_every_token_in_order_with_bos_each(tokenizer):
    max_length = 8
    batches = list(iter_token_batches(tokenizer, TEXTS, max_length=max_length, batch_size=3))
    rows = _rows(batches)
    expected = []
    for text in TEXTS:
        ids = _ids(tokenizer, text)
        body = max_length - 1
        expected += [[BOS] + ids[i : i + body] for i in range(0, len(ids), body)]
    assert rows == expected
    assert all(row[0] == BOS and BOS not in row[1:] for row in rows)
    all_ids = [t for text in TEXTS for t in _ids(tokenizer, text)]
    assert [t for row in rows for t in row[1:]] == all_ids
    assert len(_ids(tokenizer, TEXTS[1])) > 2 * max_length  # the long text really is split
    sizes = [b.tokens.shape[0] for b in batches]
    assert sum(sizes) == len(rows) and all(n == 3 for n in sizes[:-1]) and 1 <= sizes[-1] <= 3


def test_padding_and_mask(tokenizer):
    batches = list(
        iter_token_batches(tokenizer, TEXTS, max_length=12, batch_size=4, domain="english")
    )
    for batch in batches:
        assert isinstance(batch, TokenBatch)
        assert batch.domain == "english"
        assert batch.tokens.dtype == torch.long and batch.attention_mask.dtype == torch.long
        assert batch.tokens.shape == batch.attention_mask.shape
        assert batch.tokens.shape[1] <= 12
        lengths = batch.attention_mask.sum(1)
        assert lengths.max() == batch.tokens.shape[1]  # padded to the longest row only
        for row, mask, n in zip(batch.tokens, batch.attention_mask, lengths):
            assert mask[:n].eq(1).all() and mask[n:].eq(0).all()  # right padding
            assert row[n:].eq(PAD).all()
        assert batch.n_tokens == int(lengths.sum())
    assert any((b.attention_mask == 0).any() for b in batches)


def test_pad_id_fallbacks(tokenizer):
    def pad_values(tok, **kw):
        texts = ["a", "a longer text here"]
        (batch,) = iter_token_batches(tok, texts, 64, 2, bos_token_id=BOS, **kw)
        return set(batch.tokens[batch.attention_mask == 0].tolist())

    assert pad_values(tokenizer) == {PAD}
    assert pad_values(tokenizer, pad_token_id=99) == {99}
    assert pad_values(_train_tokenizer(eos_token="<eos>")) == {EOS}
    assert pad_values(_train_tokenizer()) == {0}


def test_bos_options(tokenizer):
    ids = _ids(tokenizer, TEXTS[1])
    rows = _rows(iter_token_batches(tokenizer, [TEXTS[1]], 5, 2, prepend_bos=False))
    assert rows == [ids[i : i + 5] for i in range(0, len(ids), 5)]
    rows = _rows(iter_token_batches(tokenizer, [TEXTS[0]], 64, 2, bos_token_id=7))
    assert rows == [[7] + _ids(tokenizer, TEXTS[0])]


def test_bos_errors(tokenizer):
    no_bos = _train_tokenizer(eos_token="<eos>")
    with pytest.raises(ValueError, match="bos_token_id"):
        list(iter_token_batches(no_bos, TEXTS, 8, 2))
    assert _rows(iter_token_batches(no_bos, ["hi"], 8, 2, bos_token_id=BOS))[0][0] == BOS
    with pytest.raises(ValueError, match="max_length"):
        list(iter_token_batches(tokenizer, TEXTS, 1, 2))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_token_batches(tokenizer, TEXTS, 8, 0))


def test_max_tokens_budget(tokenizer):
    full = _rows(iter_token_batches(tokenizer, TEXTS, 8, 2))
    total = sum(map(len, full))
    for budget in (1, 2, 5, 8, 9, 17, total - 3, total, total + 10):
        rows = _rows(iter_token_batches(tokenizer, TEXTS, 8, 2, max_tokens=budget))
        n = sum(map(len, rows))
        assert n <= budget
        assert n >= min(budget, total) - 1  # at most a lone BOS left unused
        assert all(len(r) >= 2 for r in rows)  # never a BOS-only chunk
        assert rows[:-1] == full[: len(rows) - 1] if rows else budget < 2
        if rows:
            assert full[len(rows) - 1][: len(rows[-1])] == rows[-1]  # the last chunk is cut
    exact = _rows(iter_token_batches(tokenizer, TEXTS, 8, 2, max_tokens=total))
    assert sum(map(len, exact)) == total


def test_streams_texts_lazily(tokenizer):
    consumed = []

    def texts():
        for i in itertools.count():
            consumed.append(i)
            yield f"sample number {i} about cats"

    first = next(iter_token_batches(tokenizer, texts(), 64, 2))
    assert first.tokens.shape[0] == 2 and len(consumed) <= 3
    # an endless corpus stops at the token budget
    batches = list(iter_token_batches(tokenizer, texts(), 16, 4, max_tokens=200))
    assert sum(b.n_tokens for b in batches) <= 200


def test_count_tokens(tokenizer):
    n_text = sum(len(_ids(tokenizer, t)) for t in TEXTS)
    n_nonempty = sum(1 for t in TEXTS if t)
    assert count_tokens(tokenizer, TEXTS) == n_text + n_nonempty
    assert count_tokens(tokenizer, TEXTS, prepend_bos=False) == n_text
    chunked = sum(b.n_tokens for b in iter_token_batches(tokenizer, TEXTS, 8, 3))
    assert count_tokens(tokenizer, TEXTS, max_length=8) == chunked
    n_rows = sum(b.tokens.shape[0] for b in iter_token_batches(tokenizer, TEXTS, 8, 3))
    assert len(list(iter_token_chunks(tokenizer, TEXTS, 8))) == n_rows


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def test_load_texts_txt(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("  first line  \n\n   \nsecond\\r\\nstill second\r\nthird\n", encoding="utf-8")
    assert load_texts(path) == ["first line", "second\\r\\nstill second", "third"]


def test_load_texts_jsonl(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"text": "hello", "body": "a"}, {"text": "", "body": "b"}]
    rows.append({"text": "world", "body": "c"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(path) == ["hello", "world"]
    assert load_texts(path, field="body") == ["a", "b", "c"]
    with pytest.raises(KeyError, match="missing"):
        load_texts(path, field="missing")
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match="c.jsonl:2: invalid JSON"):
        load_texts(path)


def test_load_texts_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_texts(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt contains no text samples"):
        load_texts(empty)
    weird = tmp_path / "c.csv"
    weird.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="extension '.csv'"):
        load_texts(weird)


def test_load_hf_dataset_local_json(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"content": f"doc {i}"}) for i in range(5)]
    path.write_text("\n".join(lines), encoding="utf-8")
    kw = dict(data_files=str(path), cache_dir=str(tmp_path / "cache"))
    assert load_hf_dataset("json", "train", field="content", **kw) == [f"doc {i}" for i in range(5)]
    first_two = load_hf_dataset("json", "train", field="content", max_samples=2, **kw)
    assert first_two == ["doc 0", "doc 1"]
    with pytest.raises(KeyError, match="text"):
        load_hf_dataset("json", "train", **kw)


def test_load_corpora(tmp_path):
    path = tmp_path / "code.txt"
    path.write_text("x = 1\ny = 2\n", encoding="utf-8")
    corpora = load_corpora({"code": path, "prose": ["a b", "c"]})
    assert corpora == {"code": ["x = 1", "y = 2"], "prose": ["a b", "c"]}
    assert load_corpora({"code": str(path)})["code"] == ["x = 1", "y = 2"]
    with pytest.raises(ValueError, match="domain 'prose'"):
        load_corpora({"code": path, "prose": ["", "  "]})
    with pytest.raises(FileNotFoundError, match="domain 'math'.*missing.txt"):
        load_corpora({"math": tmp_path / "missing.txt"})


# ---------------------------------------------------------------------------------------------
# Built-in corpora and the shared domain files
# ---------------------------------------------------------------------------------------------


def test_builtin_corpora():
    corpora = builtin_corpora()
    assert sorted(corpora) == ["chinese", "code", "english", "french", "math"]
    for domain, texts in corpora.items():
        assert 20 <= len(texts) <= 40, domain
        assert len(set(texts)) == len(texts), domain
        assert 3_000 <= sum(len(t.encode()) + 1 for t in texts) <= 8_000, domain
    assert any("def " in t for t in corpora["code"])
    assert any(" = " in t for t in corpora["math"])
    assert any("\u4e00" <= ch <= "\u9fff" for ch in corpora["chinese"][0])
    assert list(builtin_corpora(["math", "code"])) == ["math", "code"]
    with pytest.raises(KeyError, match="klingon"):
        builtin_corpora(["klingon"])


def test_builtin_corpora_match_generator():
    script = REPO / "scripts/make_sample_corpora.py"
    spec = importlib.util.spec_from_file_location("make_sample_corpora", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.generate() == module.generate()
    assert module.main(["--check"]) == 0


@pytest.mark.skipif(not SHARED_DOMAINS.is_dir(), reason="shared domain corpora not present")
def test_shared_domain_files():
    files = sorted(SHARED_DOMAINS.glob("*.txt"))
    assert files
    for path in files:
        # 49 newline characters, no trailing newline: 50 samples
        assert len(load_texts(path)) == 50, path.name
    english = SHARED_DOMAINS / "english.txt"
    if english.exists():
        assert any("\\r\\n" in t for t in load_texts(english))  # literal escapes are kept
