"""Mixers: training tokens/s and peak memory of attention vs mamba vs mamba2 vs retention vs GLA against sequence
length, the Hugging Face `MambaForCausalLM` and `Mamba2ForCausalLM` peers, and generation latency per token.

Every model has the same width, depth, heads and vocabulary, batch 1, random weights. Our models are
GPT-2 blocks (mixer + MLP); `hf-mamba` is `transformers.MambaForCausalLM` (mixer only, no MLP: fewer
parameters) with the same width, depth, state size (16), expansion (2) and conv width (4). On CPU it takes
its torch path: a sequential loop over time steps (no mamba-ssm, no mambapy). `hf-mamba2` is
`transformers.Mamba2ForCausalLM` (mixer only) of our mamba2's shape (expand 1, 32-wide heads, state 32, one B/C
group per head, chunk 64) on its torch path (`mamba2_chunk_scan`, chunked, vectorised over chunks). Our mamba trains with the
chunked selective scan (surgery.xatl.mixers.scan.selective_scan_chunked); linear mixers with chunked GLA;
`gla-w64` adds a 64-token softmax window to each GLA mixer (surgery.xatl.mixers.scan.window_attention).
flash-linear-attention's naive torch references join when `fla` imports (on CPU it needs triton too:
`pip install -e '.[bench]'`): the recurrence alone, ours against theirs, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from benchmarks.measure import interleaved, paired_ratio
from benchmarks.report import progress_line
from surgery.xatl.hybrid.cache import CACHE_ARG
from benchmarks.generation import Decoder

HF_MAMBA_CACHE = "cache" if CACHE_ARG == "cache" else "cache_params"  # MambaForCausalLM's name before 5.24
from surgery.xatl.mixers import MIXERS
from surgery.xatl.hybrid.model import HybridGPT2LMHeadModel, hybrid_config_from
from surgery.xatl.mixers.scan import gla_chunked

SEQS = (256, 512, 1024, 2048, 4096)
MODELS = ("attention", "mamba", "mamba2", "retention", "gla", "gla-w64", "hf-mamba2", "hf-mamba")
PEERS = {"mamba": "hf-mamba", "mamba2": "hf-mamba2"}  # our mixer -> transformers' model of the same mixer
VARIANTS = {"gla-w64": ("gla", {"window": 64})}  # GLA with exact softmax attention over its last 64 tokens


def fla_status() -> str:
    """"available" if flash-linear-attention's naive GLA reference imports, else why not."""
    try:
        from fla.ops.gla.naive import naive_recurrent_gla  # noqa: F401
    except Exception as err:  # noqa: BLE001 - not installed, or triton missing on CPU
        return f"not available on CPU ({type(err).__name__}: {str(err)[:80]})"
    return "available"


def build(names=MODELS, width: int = 128, depth: int = 2, heads: int = 4, vocab: int = 4096,
          max_seq: int = 4096, seed: int = 0) -> dict:
    cfg = GPT2Config(n_layer=depth, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max_seq + 64,
                     bos_token_id=0, eos_token_id=0)
    models = {}
    for name in names:
        torch.manual_seed(seed)
        if name == "attention":
            models[name] = GPT2LMHeadModel(cfg)
        elif name == "hf-mamba2":
            models[name] = Mamba2ForCausalLM(Mamba2Config(
                vocab_size=vocab, hidden_size=width, num_heads=heads, head_dim=width // heads, expand=1,
                state_size=width // heads, n_groups=heads, num_hidden_layers=depth, conv_kernel=4, chunk_size=64,
                use_bias=True, bos_token_id=0, eos_token_id=0, pad_token_id=0))
        elif name == "hf-mamba":
            models[name] = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=width, state_size=16,
                                                        num_hidden_layers=depth, expand=2, conv_kernel=4,
                                                        use_mambapy=False, bos_token_id=0, eos_token_id=0))
        else:
            mixer, options = VARIANTS.get(name, (name, None))
            models[name] = HybridGPT2LMHeadModel(hybrid_config_from(cfg, mixer, options))
    return models


class TrainStep:
    """Forward, LM loss, backward, AdamW step on a fixed (1, T) batch."""

    def __init__(self, model, ids: torch.Tensor):
        self.model, self.ids = model.train(), ids
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model(self.ids, labels=self.ids).loss.backward()
        self.opt.step()


def train_rows(models: dict, seqs=SEQS, repeats: int = 3, warmup: int = 1, max_seq: dict | None = None,
               long_seq: int = 1024, verbose: bool = False) -> list[dict]:
    """One row per (model, seq): {"model", "seq", "step_s", "tok_s", "ratio_to_attention" (time ratio,
    paired), "peak_mib", "params"}; all models of a seq are timed interleaved. A model runs only up to
    `max_seq[name]` tokens (default: all); above `long_seq` tokens one round without warm-up is timed."""
    rows, max_seq = [], max_seq or {}
    for seq in seqs:
        ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (1, seq),
                            generator=torch.Generator().manual_seed(seq))
        here = {n: m for n, m in models.items() if seq <= max_seq.get(n, seq)}
        long = seq > long_seq
        t = interleaved({n: TrainStep(m, ids) for n, m in here.items()}, 1 if long else repeats, 0 if long else warmup)
        for name, m in here.items():
            row = {"model": name, "seq": seq, "step_s": t[name]["median_s"], "tok_s": seq / t[name]["median_s"],
                   "ratio_to_attention": paired_ratio(t, name, "attention") if "attention" in t else None,
                   "peak_mib": t[name]["peak_mib"], "params": sum(p.numel() for p in m.parameters())}
            if name in PEERS and PEERS[name] in t:
                row["speedup_vs_hf"] = paired_ratio(t, PEERS[name], name)
            rows.append(row)
            if verbose:
                print(progress_line(row), flush=True)
        for m in models.values():
            m.zero_grad(set_to_none=True)
    return rows


def mamba2_mixer_rows(seqs=(256, 1024), width: int = 128, heads: int = 4, batch: int = 1, repeats: int = 5,
                      verbose: bool = False) -> list[dict]:
    """One Mamba-2 mixer alone, ours vs transformers' `Mamba2Mixer` (torch path) holding the same weights (one
    B/C group per head, d_state = head width, chunk 64): forward + backward of a (batch, T, width) input, timed
    interleaved. One row per T: {"seq", "ours_s", "hf_s", "speedup_vs_hf" (paired), "max_abs_diff"}."""
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer

    from surgery.xatl.mixers import build_mixer

    rows = []
    for seq in seqs:
        torch.manual_seed(seq)
        ours = build_mixer("mamba2", width, heads, chunk=64)
        cfg = Mamba2Config(hidden_size=width, num_heads=heads, head_dim=width // heads, expand=1, n_groups=heads,
                           state_size=width // heads, use_bias=True, conv_kernel=4, chunk_size=64, num_hidden_layers=1)
        hf = HFMamba2Mixer(cfg, layer_idx=0)
        hf.load_state_dict(ours.state_dict())
        x = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seq))
        fns = {"ours": lambda: ours(x)[0], "hf": lambda: hf(x)}
        steps = {n: (lambda fn=fn: fn().square().mean().backward()) for n, fn in fns.items()}
        t = interleaved(steps, repeats, warmup=1, memory=False)
        with torch.no_grad():
            diff = (fns["ours"]() - fns["hf"]()).abs().max().item()
        row = {"seq": seq, "batch": batch, "ours_s": t["ours"]["median_s"], "hf_s": t["hf"]["median_s"],
               "speedup_vs_hf": paired_ratio(t, "hf", "ours"), "max_abs_diff": diff}
        rows.append(row)
        if verbose:
            print(progress_line(row), flush=True)
    return rows


def generation_rows(models: dict, contexts=SEQS, new_tokens: int = 32, warmup: int = 2,
                    verbose: bool = False) -> list[dict]:
    """One row per (model, context): {"model", "context", "ms_per_token" (median step), "ms_fastest",
    "ratio_to_attention" (paired median)}, plus "hf_over_ours" on the rows of mixers with a transformers peer. The models decode in turn,
    one token each per round (order alternating), so a ratio compares steps taken moments apart."""
    rows = []
    for context in contexts:
        steps = {name: Decoder(model.eval(), context, cache_key=HF_MAMBA_CACHE if name.startswith("hf-") else CACHE_ARG)
                 for name, model in models.items()}
        t = interleaved(steps, new_tokens, warmup, memory=False)
        for name in models:
            row = {"model": name, "context": context, "ms_per_token": 1e3 * t[name]["median_s"],
                   "ms_fastest": 1e3 * min(t[name]["times"]),
                   "ratio_to_attention": paired_ratio(t, name, "attention") if "attention" in t else None}
            if name in PEERS and PEERS[name] in t:
                row["hf_over_ours"] = paired_ratio(t, PEERS[name], name)
            rows.append(row)
            if verbose:
                print(progress_line(row), flush=True)
    return rows


def recurrence_rows(seqs=SEQS, heads: int = 4, head_dim: int = 32, repeats: int = 2, fla_max_seq: int = 2048,
                    verbose: bool = False) -> list[dict]:
    """One layer's linear-attention recurrence, forward + backward, (1, heads, T, head_dim): our
    `gla_chunked` (chunks as the mixers use them) against flash-linear-attention's naive references, GLA (per-key decay) against
    `naive_recurrent_gla` and retention (one decay per head) against `naive_chunk_simple_gla`.
    One row per (mixer, seq): {"mixer", "seq", "ours_s", "fla_s", "fla_over_ours", "max_abs_diff"}
    (fla_* None above `fla_max_seq`). Requires `fla` to import (see `fla_status`)."""
    from fla.ops.gla.naive import naive_recurrent_gla
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    def bthd(x):  # ours (B, H, T, D) -> fla's (B, T, H, D)
        return x.transpose(1, 2)

    refs = {
        "gla": lambda q, k, v, g: bthd(naive_recurrent_gla(bthd(q), bthd(k), bthd(v), bthd(g))[0]),
        "retention": lambda q, k, v, g: bthd(naive_chunk_simple_gla(bthd(q), bthd(k), bthd(v), bthd(g)[..., 0])[0]),
    }
    rows = []
    for seq in seqs:
        gen = torch.Generator().manual_seed(seq)
        q, k, v = (torch.randn(1, heads, seq, head_dim, generator=gen) for _ in range(3))
        decays = {"gla": F.logsigmoid(torch.randn(1, heads, seq, head_dim, generator=gen) + 4),
                  "retention": torch.log(1 - 2.0 ** (-5.0 - torch.arange(heads))).view(1, heads, 1, 1).expand(1, heads, seq, 1)}
        grad_out = torch.randn(1, heads, seq, head_dim, generator=gen)
        for mixer, g in decays.items():
            inputs = [t.clone().requires_grad_() for t in (q, k, v)] + [g.clone()]
            chunk = MIXERS[mixer](heads * head_dim, heads).chunk  # as the mixer trains
            fns = {"ours": lambda chunk=chunk: gla_chunked(inputs[0] * head_dim ** -0.5, *inputs[1:], chunk=chunk)[0],
                   "fla": lambda mixer=mixer: refs[mixer](*inputs)}
            if seq > fla_max_seq:
                del fns["fla"]
            steps = {name: (lambda fn=fn: fn().backward(grad_out)) for name, fn in fns.items()}
            t = interleaved(steps, repeats, warmup=1, memory=False)
            row = {"mixer": mixer, "seq": seq, "ours_s": t["ours"]["median_s"], "fla_s": None, "fla_over_ours": None,
                   "max_abs_diff": None}
            if "fla" in t:
                with torch.no_grad():
                    diff = (fns["ours"]() - fns["fla"]()).abs().max().item()
                row.update(fla_s=t["fla"]["median_s"], fla_over_ours=paired_ratio(t, "fla", "ours"), max_abs_diff=diff)
            rows.append(row)
            if verbose:
                print(progress_line(row), flush=True)
    return rows
