"""The analyses of the LN-removal papers, run by `surgery verify` on a model and its baseline.

Baroni et al. 2025 ("Transformers don't need LayerNorm at inference time") compare an LN-free model with its
original on: output entropy and calibration, the first position's residual norm, attention sinks, and the
final layer's entropy neurons (Stolfo et al. 2024, "Confidence regulation neurons"), which write into the
unembedding's effective null space and so act on the logits only through the final norm's per-token scale.

Everything except the per-head sinks runs on the Hugging Face model (any family in `surgery.families`).
Shapes: tokens (batch, pos); logits (..., vocab); entropies and losses in nats per predicted token.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from surgery.families import blocks as model_blocks
from surgery.families import family_of, get_module, in_out_weight

N_BINS = 10  # equal-width confidence bins of the calibration error
SINK_THRESHOLD = 0.3  # a head is a sink head when its mean attention on position 0 (queries >= 1) exceeds this
NULL_SPACE_SHARE = 0.05  # the null space: this share of the unembedding's singular directions (the smallest, >= 1)
LARGE_NORM_QUANTILE = 0.9  # entropy neurons: output-weight norm at or above this quantile of the layer's neurons
NULL_ENRICHMENT = 10.0  # ... and a null-space fraction at least this many times a random direction's (k / d)


class OutputStats:
    """Running entropy, cross-entropy and confidence bins of next-token predictions."""

    def __init__(self, n_bins: int = N_BINS):
        self.n_bins, self.tokens, self.entropy, self.loss = n_bins, 0, 0.0, 0.0
        self.count = torch.zeros(n_bins, dtype=torch.float64)
        self.confidence = torch.zeros(n_bins, dtype=torch.float64)  # sums of top-1 probabilities per bin
        self.correct = torch.zeros(n_bins, dtype=torch.float64)  # top-1 hits per bin

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """logits (..., vocab) predicting targets (...); float64 logits stay float64, others are computed in fp32."""
        logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1).flatten(0, -2)
        targets = targets.flatten()
        self.entropy += -(logp.exp() * logp).sum(-1).double().sum().item()
        self.loss += -logp.gather(-1, targets[:, None]).double().sum().item()
        conf, pred = logp.max(-1)
        conf = conf.double().exp()
        bins = (conf * self.n_bins).long().clamp(max=self.n_bins - 1)  # [b/10, (b+1)/10), the last bin holds 1.0
        self.count += torch.bincount(bins, minlength=self.n_bins).double()
        self.confidence += torch.bincount(bins, conf, minlength=self.n_bins)
        self.correct += torch.bincount(bins, (pred == targets).double(), minlength=self.n_bins)
        self.tokens += targets.numel()

    def result(self) -> dict:
        n = max(self.tokens, 1)
        seen = self.count.clamp_min(1)
        return {
            "entropy": self.entropy / n,
            "loss": self.loss / n,
            "ece": ((self.correct - self.confidence).abs().sum() / n).item(),  # sum_b n_b/N |acc_b - conf_b|
            "confidence": (self.confidence.sum() / n).item(),
            "accuracy": (self.correct.sum() / n).item(),
            "tokens": self.tokens,
            "bins": {"count": self.count.tolist(), "confidence": (self.confidence / seen).tolist(), "accuracy": (self.correct / seen).tolist()},
        }


def output_stats(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = N_BINS) -> dict:
    """Entropy, loss, ECE (see `OutputStats.result`) of one logits tensor (..., vocab) against targets (...)."""
    stats = OutputStats(n_bins)
    stats.add(logits, targets)
    return stats.result()


@torch.no_grad()
def _stats_over(hf_model, blocks, batch_size: int) -> OutputStats:
    stats, device = OutputStats(), next(hf_model.parameters()).device
    for batch in DataLoader(blocks, batch_size=batch_size):
        batch = batch.to(device)
        stats.add(hf_model(batch).logits[:, :-1], batch[:, 1:])
    return stats


@torch.no_grad()
def first_position_norms(hf_model, tokens: torch.Tensor) -> dict:
    """Per layer l (the residual stream after block l): mean L2 norm at position 0, mean norm at positions >= 1,
    and their ratio (first / others); lists of n_layers floats."""
    captured = []
    handles = [b.register_forward_hook(lambda m, a, out: captured.append(out[0] if isinstance(out, tuple) else out))
               for b in model_blocks(hf_model)]
    try:
        hf_model(tokens)
    finally:
        for h in handles:
            h.remove()
    norms = [r.double().norm(dim=-1) for r in captured]  # (batch, pos) each
    first, others = [n[:, 0].mean().item() for n in norms], [n[:, 1:].mean().item() for n in norms]
    return {"first": first, "others": others, "ratio": [f / o for f, o in zip(first, others)]}


@torch.no_grad()
def null_space_scores(hf_model) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(norm (d_mlp,), null-space fraction (d_mlp,), chance) of each final-layer MLP neuron's output weight w_out.

    Effective unembedding (vocab, d): W_U * w_f (the final norm's gain folded in), centered over the vocabulary
    (softmax ignores a shift common to every logit). For a LayerNorm, w_out and the unembedding are restricted to
    the centered subspace (the norm removes the mean). The null space is spanned by the k = max(1, round(0.05 d))
    right singular vectors with the smallest singular values (d: the dimension of the subspace);
    fraction = ||P_null w_out||^2 / ||w_out||^2; chance = k / d, a random direction's expected fraction.
    """
    fam = family_of(hf_model)
    w_out = in_out_weight(_mlp_out(hf_model)).detach().double()  # (d_mlp, d)
    gain = get_module(hf_model, fam.final_norm).weight.detach().double() + fam.norm_gain_offset  # Gemma: (1 + weight)
    w_u = get_module(hf_model, fam.lm_head).weight.detach().double() * gain
    w_u = w_u - w_u.mean(0)
    d = w_u.shape[1]
    basis = torch.eye(d, dtype=torch.float64)
    if fam.norm_kind == "layernorm":  # orthonormal basis of the centered subspace (d, d - 1)
        vals, vecs = torch.linalg.eigh(basis - 1.0 / d)
        basis = vecs[:, vals > 0.5]
    k = max(1, round(NULL_SPACE_SHARE * basis.shape[1]))
    _, vecs = torch.linalg.eigh((w_u @ basis).T @ (w_u @ basis))  # ascending sigma^2: the first k span the null space
    null = basis @ vecs[:, :k]  # (d, k)
    w = w_out @ basis @ basis.T
    norm = w.norm(dim=-1)
    return norm, (w @ null).pow(2).sum(-1) / norm.pow(2).clamp_min(1e-300), k / basis.shape[1]


def select_entropy_neurons(norm: torch.Tensor, fraction: torch.Tensor, chance: float) -> list[int]:
    """Neurons with norm >= the 0.9 quantile of the layer AND null-space fraction >= 10 * chance, by descending norm."""
    keep = (norm >= torch.quantile(norm, LARGE_NORM_QUANTILE)) & (fraction >= NULL_ENRICHMENT * chance)
    return sorted(keep.nonzero().flatten().tolist(), key=lambda i: -norm[i].item())


def _mlp_out(hf_model):
    return get_module(model_blocks(hf_model)[-1], family_of(hf_model).mlp_out)


@torch.no_grad()
def entropy_neurons(hf_model, blocks, batch_size: int = 8) -> tuple[dict, dict]:
    """(clean output stats on `blocks`, entropy-neuron report): which final-layer neurons are entropy neurons and
    what mean-ablating them (each activation, the input of the MLP's output projection, set to its mean over
    every position of `blocks`) does to the loss and the mean entropy."""
    norm, fraction, chance = null_space_scores(hf_model)
    neurons = select_entropy_neurons(norm, fraction, chance)
    total = {"sum": 0.0, "n": 0}

    def record(module, args):
        total["sum"] = total["sum"] + args[0].double().flatten(0, -2).sum(0)
        total["n"] += args[0].shape[:-1].numel()

    handle = _mlp_out(hf_model).register_forward_pre_hook(record)
    try:
        clean = _stats_over(hf_model, blocks, batch_size).result()
    finally:
        handle.remove()
    large = norm >= torch.quantile(norm, LARGE_NORM_QUANTILE)
    report = {"neurons": neurons, "norm": norm.tolist(), "null_fraction": fraction.tolist(),
              "norm_threshold": norm[large].min().item(), "null_fraction_threshold": NULL_ENRICHMENT * chance,
              "max_null_fraction_large_norm": fraction[large].max().item(), "delta_loss": 0.0, "delta_entropy": 0.0}
    if neurons:
        mean = (total["sum"] / total["n"])[neurons]

        def ablate(module, args):
            x = args[0].clone()
            x[..., neurons] = mean.to(x.dtype)
            return (x, *args[1:])

        handle = _mlp_out(hf_model).register_forward_pre_hook(ablate)
        try:
            ablated = _stats_over(hf_model, blocks, batch_size).result()
        finally:
            handle.remove()
        report["delta_loss"] = ablated["loss"] - clean["loss"]
        report["delta_entropy"] = ablated["entropy"] - clean["entropy"]
    return clean, report


def paper_analyses(hf_model, sinks: torch.Tensor, blocks, tokens: torch.Tensor, batch_size: int = 8) -> dict:
    """Every analysis above: output stats and entropy neurons on every block of `blocks` (a Dataset of (T,)
    LongTensors), first-position norms on `tokens` (batch, pos), and the sink rate of `sinks` (n_layers, n_heads;
    `surgery.lens.checks.attention_sink_heads` on the same tokens)."""
    output, neurons = entropy_neurons(hf_model, blocks, batch_size)
    return {
        "output": output,
        "first_position_norm": first_position_norms(hf_model, tokens),
        "attention_sink_rate": (sinks > SINK_THRESHOLD).double().mean().item(),
        "attention_sink_heads": sinks.tolist(),
        "entropy_neurons": neurons,
    }
