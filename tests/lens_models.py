"""Tiny GPT-2 models for the lens tests: random ones with LayerNorms, and LN-free exports built by hand.

`make_ln_free` follows the export contract of `surgery.remove_ln.export` (ln_1/ln_2: weight 1e6, bias 0;
ln_f: weight 1e6 * w / sigma, bias b; eps 1e12; `config.surgery_ln_free`), with a random affine folded
into c_attn / c_fc, so the result is a genuinely LN-free model: no per-token scale anywhere.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tiny_models import tiny_gpt2

__all__ = ["tiny_gpt2", "make_ln_free", "write_text_corpus", "save_model_dirs"]

SCALE, EPS = 1e6, 1e12


@torch.no_grad()
def make_ln_free(model: GPT2LMHeadModel, seed: int = 1) -> GPT2LMHeadModel:
    """Turn `model` (changed in place) into an LN-free export."""
    gen = torch.Generator().manual_seed(seed)
    d = model.config.n_embd
    for block in model.transformer.h:
        for ln, proj in ((block.ln_1, block.attn.c_attn), (block.ln_2, block.mlp.c_fc)):
            gain = 1.0 + 0.5 * torch.rand(d, generator=gen)  # a trained affine and 1/sigma, folded into the reader
            shift = 0.1 * torch.randn(d, generator=gen)
            proj.bias += shift @ proj.weight
            proj.weight *= gain[:, None]
            ln.weight.fill_(SCALE)
            ln.bias.zero_()
            ln.eps = EPS
    tokens = torch.randint(0, model.config.vocab_size, (4, 32), generator=gen)
    sigma = _final_residual_std(model, tokens)
    ln_f = model.transformer.ln_f
    ln_f.weight.copy_(SCALE * ln_f.weight / sigma)
    ln_f.eps = EPS
    model.config.layer_norm_epsilon = EPS
    model.config.surgery_ln_free = {"scale": SCALE}
    return model


def _final_residual_std(model: GPT2LMHeadModel, tokens: torch.Tensor) -> float:
    captured = {}
    handle = model.transformer.ln_f.register_forward_hook(lambda m, args, out: captured.setdefault("x", args[0]))
    model(tokens)
    handle.remove()
    x = captured["x"]
    return (x - x.mean(-1, keepdim=True)).pow(2).mean().sqrt().item()


def write_text_corpus(path, n_docs: int = 300) -> str:
    """A .jsonl corpus of `n_docs` chunks of standard-library source (about 2% of documents are validation)."""
    import json
    import sysconfig
    from pathlib import Path

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-m]*.py"))
    text = "".join(f.read_text(errors="ignore") for f in files[:40])
    chunk = max(200, len(text) // n_docs)
    Path(path).write_text("".join(json.dumps({"text": text[i * chunk : (i + 1) * chunk]}) + "\n" for i in range(n_docs)))
    return str(path)


def save_model_dirs(root, corpus_path: str, vocab: int = 300):
    """(baseline_dir, ln_free_dir): a tiny GPT-2 with LayerNorms and an LN-free one, each with a BPE tokenizer."""
    from pathlib import Path

    from surgery.data.corpus import Corpus
    from surgery.data.tokenizer import train_bpe

    tokenizer = train_bpe(Corpus(corpus_path), vocab)
    dirs = []
    for name, ln_free in (("baseline", False), ("ln_free", True)):
        model = tiny_gpt2(vocab_size=len(tokenizer))
        if ln_free:
            make_ln_free(model)
        out = Path(root) / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        dirs.append(str(out))
    return tuple(dirs)
