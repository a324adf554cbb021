"""Tiny random models for the LN-tuning tests (seconds on one core)."""

import torch
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel


def tiny_gpt2(seed: int = 0, vocab_size: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    _perturb_norms(model)
    return model


def tiny_gpt2_classifier(seed: int = 0) -> GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=64, num_labels=2, pad_token_id=0,
                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2ForSequenceClassification(cfg)
    _perturb_norms(model)
    return model


def tiny_bert(seed: int = 0, vocab_size: int = 50) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(cfg)
    _perturb_norms(model)
    return model


def _perturb_norms(model) -> None:
    """Fresh norms are all ones and zeros: give every entry its own value so that masks and Fisher scores differ."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.add_(0.3 * torch.randn_like(m.weight))
                m.bias.add_(0.1 * torch.randn_like(m.bias))


def padded_batch(seed: int = 0, batch: int = 5, length: int = 12, vocab: int = 50) -> dict:
    """A classification batch with right padding (pad id 0) in two of its rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    attention = torch.ones_like(ids)
    for row, keep in ((0, 8), (2, 5)):
        ids[row, keep:], attention[row, keep:] = 0, 0
    return {"input_ids": ids, "attention_mask": attention, "labels": torch.randint(0, 2, (batch,), generator=g)}
