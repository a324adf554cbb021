"""Generation cost per token against context length: GPT-2 attention vs the linear-cost mixers (XATL hybrids).

Every model has the same width, depth, heads and vocabulary (random weights: speed does not depend on them).
For each context length L a prompt of L tokens is run once to fill the cache (KV cache for attention, fixed-size
recurrent state for the mixers); then `new_tokens` tokens are decoded one at a time with the cache; the
fastest step is the per-token latency (as `timeit` does: on a shared machine the slower steps measure the
other jobs), the median is kept beside it. The cache's size per sequence is reported too.
Speed is given as a ratio to attention at the same L, measured in the same run (shared machines are noisy).

    rows = run_benchmark(contexts=[256, 1024])   # list of dicts; table(rows) -> Markdown; plot(rows, path)

`python -m benchmarks.xatl_generation` runs it from the command line and writes JSON, Markdown and a PNG.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel

from surgery.xatl.hybrid.cache import CACHE_ARG, HybridCache
from surgery.xatl.hybrid.model import HybridGPT2LMHeadModel, hybrid_config_from

CONTEXTS = (256, 512, 1024, 2048, 4096)
MIXERS = ("mamba", "retention", "gla")


def build_models(width: int = 256, depth: int = 4, heads: int = 4, vocab: int = 4096, max_context: int = 4096,
                 mixers: tuple[str, ...] = MIXERS, seed: int = 0) -> dict[str, PreTrainedModel]:
    """"attention" (GPT2LMHeadModel) and one all-mixer hybrid per name in `mixers`, same shape, eval mode."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=depth, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max_context + 64,
                     bos_token_id=0, eos_token_id=0)
    models: dict[str, PreTrainedModel] = {"attention": GPT2LMHeadModel(cfg)}
    for name in mixers:
        models[name] = HybridGPT2LMHeadModel(hybrid_config_from(cfg, name))
    return {k: m.eval() for k, m in models.items()}


def cache_bytes(cache) -> int:
    """Bytes held by a cache (KV tensors or recurrent states), all layers together."""
    if isinstance(cache, HybridCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


class Decoder:
    """Greedy decoding with a cache: the constructor runs a `context`-token prompt (seconds in `prefill_s`),
    each call decodes one more token. `cache_key` names the cache argument and output field: `CACHE_ARG`
    (the installed transformers' name) for GPT-2 and our hybrids; `MambaForCausalLM` before transformers 5.24
    used "cache_params"."""

    def __init__(self, model: PreTrainedModel, context: int, batch: int = 1, seed: int = 0,
                 cache_key: str = CACHE_ARG):
        self.model, self.key = model, cache_key
        ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(seed))
        start = time.perf_counter()
        with torch.no_grad():
            out = model(ids, use_cache=True)
        self.prefill_s = time.perf_counter() - start
        self.cache, self.next = out[cache_key], out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def __call__(self) -> None:
        out = self.model(self.next, use_cache=True, **{self.key: self.cache})
        self.cache, self.next = out[self.key], out.logits[:, -1:].argmax(-1)


def time_decode(model: PreTrainedModel, context: int, new_tokens: int = 16, warmup: int = 2, batch: int = 1,
                seed: int = 0) -> dict:
    """Fill the cache with a `context`-token prompt, then decode `warmup + new_tokens` tokens one at a time.

    Returns {"ms_per_token": ms of the fastest decoding step (batch sequences at once), "ms_median": the
    median step, "prefill_s": seconds to run the prompt, "cache_bytes_per_seq": cache size per sequence after
    the last step, "cache_tokens": tokens the cache has seen (context + every decoded step: a decode that
    dropped its state would show less)}."""
    decoder, times = Decoder(model, context, batch, seed), []
    for i in range(warmup + new_tokens):
        start = time.perf_counter()
        decoder()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"ms_per_token": 1e3 * min(times), "ms_median": 1e3 * statistics.median(times),
            "prefill_s": decoder.prefill_s, "cache_bytes_per_seq": cache_bytes(decoder.cache) // batch,
            "cache_tokens": decoder.cache.get_seq_length()}


def run_benchmark(contexts=CONTEXTS, mixers=MIXERS, new_tokens: int = 16, batch: int = 1, repeats: int = 1,
                  models: dict[str, PreTrainedModel] | None = None, verbose: bool = False, **model_kw) -> list[dict]:
    """One row per (model, context): {"model", "context", "ms_per_token", "ms_median", "prefill_s",
    "cache_bytes_per_seq", "ratio_to_attention"}. Every model first decodes a few tokens untimed (cold caches
    and lazy initialisation would otherwise land on whichever model goes first); with `repeats` > 1 the whole
    sweep runs again and each cell keeps its fastest run. ratio_to_attention = this model's ms / attention's
    ms at that context (< 1: faster than attention)."""
    models = models or build_models(mixers=tuple(mixers), max_context=max(contexts), **model_kw)
    for model in models.values():
        time_decode(model, min(contexts), 2, warmup=0, batch=batch)
    best: dict[tuple[str, int], dict] = {}
    for _ in range(repeats):
        for context in contexts:
            for name, model in models.items():
                row = {"model": name, "context": context, **time_decode(model, context, new_tokens, batch=batch)}
                key = (name, context)
                if key not in best or row["ms_per_token"] < best[key]["ms_per_token"]:
                    best[key] = row
                if verbose:
                    print(json.dumps(row), flush=True)
    rows = [best[(name, c)] for c in contexts for name in models]
    for row in rows:
        row["ratio_to_attention"] = row["ms_per_token"] / best[("attention", row["context"])]["ms_per_token"] \
            if ("attention", row["context"]) in best else None
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per model, ms/token (ratio to attention) per context, cache size at the largest."""
    contexts = sorted({r["context"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["context"]): r for r in rows}
    head = "| model | " + " | ".join(f"L={c}" for c in contexts) + f" | cache/seq at L={contexts[-1]} |"
    lines = [head, "|" + "---|" * (len(contexts) + 2)]
    for n in names:
        cells = []
        for c in contexts:
            r = by[(n, c)]
            ratio = "" if n == "attention" or r["ratio_to_attention"] is None else f" ({r['ratio_to_attention']:.2f}x)"
            cells.append(f"{r['ms_per_token']:.2f} ms{ratio}")
        kib = by[(n, contexts[-1])]["cache_bytes_per_seq"] / 1024
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {kib:,.0f} KiB |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = sorted((r["context"], r["ms_per_token"]) for r in rows if r["model"] == name)
        ax.plot(*zip(*pts), marker="o", label=name, lw=2.5 if name == "attention" else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="context length (tokens)", ylabel="decoding time per token (ms)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
