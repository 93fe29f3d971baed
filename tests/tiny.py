"""Tiny hooked MoE models with a tiny tokenizer, for tests that need text.

`tiny_model(config, folder)` saves a tiny random HF model (see `hf_models.py`) together with a
97-token BPE tokenizer into `folder`, in the hub layout, and loads it back with
`HookedMoETransformer.from_pretrained`, so the model's `tokenizer` is the checkpoint's own.
"""

from __future__ import annotations

from pathlib import Path

from hf_models import build_hf, save_hf

from moe_hooked import HookedMoETransformer

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]
"""Ids 0..3; pad, bos and eos match `hf_models.BASE`."""

TRAIN_TEXTS = [
    "The cat sat on the mat and looked at the moon.",
    "Routers send each token to a few experts; the experts add their outputs.",
    "def add(a, b): return a + b",
    "Le chat dort sur le canape, la nuit est calme.",
    "2 + 3 = 5 and 7 * 6 = 42, so 42 / 6 = 7.",
]


def tiny_tokenizer(vocab_size: int = 97):
    """A BPE tokenizer of at most `vocab_size` ids trained on `TRAIN_TEXTS` (unknown characters -> <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, limit_alphabet=vocab_size // 2, show_progress=False
    )
    tok.train_from_iterator(TRAIN_TEXTS, trainer)
    assert tok.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_model(config, folder: Path, seed: int = 0) -> HookedMoETransformer:
    """Save `build_hf(config, seed)` with `tiny_tokenizer()` into `folder` and load it hooked."""
    save_hf(build_hf(config, seed), folder, tiny_tokenizer(config.vocab_size))
    return HookedMoETransformer.from_pretrained(str(folder))
