"""Tokenizers: any Hugging Face tokenizer by name or path, or a byte-level BPE trained on the corpus."""

from __future__ import annotations

import re
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from surgery.data.corpus import Corpus, fingerprint, load_documents
from surgery.models.paths import cache_dir

EOS = "<|endoftext|>"
_BPE_SPEC = re.compile(r"^bpe-(\d+)$")


def train_bpe(corpus: Corpus, vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE with `<|endoftext|>` as its only special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(load_documents(corpus, "train"), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def get_tokenizer(spec: str, corpus: Corpus | None = None) -> PreTrainedTokenizerFast:
    """`bpe-N` trains (once, then caches) an N-entry BPE on `corpus`; anything else is a model name or path."""
    match = _BPE_SPEC.match(spec)
    if match is None:
        from surgery.models.loading import load_tokenizer

        return load_tokenizer(spec)
    corpus = corpus or Corpus()
    path = cache_dir() / "tokenizers" / f"{spec}-{fingerprint(corpus)}"
    if not (path / "tokenizer.json").exists():
        tok = train_bpe(corpus, int(match.group(1)))
        tok.save_pretrained(str(path))
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        from surgery.errors import SurgeryError

        raise SurgeryError(f"tokenizer {tokenizer.name_or_path!r} has no end-of-text token to separate documents")
    return tokenizer.eos_token_id
