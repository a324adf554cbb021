"""Tiny random models for the LN-tuning tests (seconds on one core)."""

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2ForSequenceClassification

from tiny_models import randomize_norms, tiny_config, tiny_gpt2

__all__ = ["tiny_gpt2", "tiny_gpt2_classifier", "tiny_bert", "padded_batch"]


def tiny_gpt2_classifier(seed: int = 0) -> GPT2ForSequenceClassification:
    """The tiny GPT-2 (tiny_models) with a two-class head; pad id 0."""
    torch.manual_seed(seed)
    return randomize_norms(GPT2ForSequenceClassification(tiny_config(num_labels=2, pad_token_id=0)))


def tiny_bert(seed: int = 0, vocab_size: int = 50) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return randomize_norms(BertForSequenceClassification(cfg))


def padded_batch(seed: int = 0, batch: int = 5, length: int = 12, vocab: int = 50) -> dict:
    """A classification batch with right padding (pad id 0) in two of its rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    for row, keep in ((0, 8), (2, 5)):
        ids[row, keep:], attention[row, keep:] = 0, 0
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.randint(0, 2, (batch,), generator=g)}
