"""The empirical Fisher of every norm entry (LayerNorm gains and biases, RMSNorm gains): squared
per-example gradients of the log-likelihood, averaged over examples (as in FISH masks, Sung et al. 2021).

    F[j] = (1/N) sum_i (d log p(y_i | x_i) / d theta_j)^2

`log_likelihood(model, batch)` returns one log-likelihood per example, shape (B,): the log-probability
of the true label for classification, the mean log-probability of each next token for a causal LM
(`label_log_likelihood`, `next_token_log_likelihood`). The model runs in eval mode (no dropout).

Per-example gradients come from one batched backward: for y = x_hat * w + b (x_hat the normalised
input), dL_i/dw = sum_t g_it * x_hat_it and dL_i/db = sum_t g_it, with g the gradient at the norm's
output. x_hat is recomputed from the norm's input: (x - mean) / sqrt(var + eps) for a LayerNorm,
x / sqrt(mean(x^2) + eps) for an RMSNorm (nn.RMSNorm, or a Llama-style family's *RMSNorm with its own
epsilon). Every batch checks that x_hat * w (+ b) reproduces the norm's output; a norm that
computes something else is an error, not a silent wrong score. This needs examples that do not interact
(true for transformers in eval mode, with padding masked). `method="loop"` takes one backward per example
instead: the reference, and the path for norms without a closed form here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import norm_eps, norm_kind
from surgery.ln_tune.params import ln_parameters, norm_modules, registry_family

Batch = torch.Tensor | dict[str, torch.Tensor]
LogLik = Callable[[nn.Module, Batch], torch.Tensor]


def label_log_likelihood(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(label | text) per example, (B,), for a *ForSequenceClassification model."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logp = F.log_softmax(model(**inputs).logits.float(), dim=-1)
    return logp.gather(1, batch["labels"][:, None]).squeeze(1)


def next_token_log_likelihood(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean over positions of log p(token t+1 | tokens <= t) per sequence, (B,) nats, for a causal LM."""
    logits = model(batch).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    return -nll.mean(1)


def _batch_size(batch: Batch) -> int:
    return (batch["input_ids"] if isinstance(batch, dict) else batch).shape[0]


def _example(batch: Batch, i: int) -> Batch:
    if isinstance(batch, dict):
        return {k: v[i : i + 1] for k, v in batch.items()}
    return batch[i : i + 1]


def fisher_scores(
    model: nn.Module,
    batches: Iterable[Batch],
    log_likelihood: LogLik,
    max_examples: int | None = None,
    method: str = "hooks",
) -> dict[str, torch.Tensor]:
    """Empirical Fisher of each norm gain and bias (`ln_parameters`): name -> float64 tensor of the parameter's shape.

    Averages over the examples of `batches` (at most `max_examples`). `method`: "hooks" (closed form, one
    backward per batch; "loop" where a norm has no closed form here) or "loop". Leaves the model's
    `requires_grad` flags and train/eval mode as they were.
    """
    params = ln_parameters(model)
    if method not in ("hooks", "loop"):
        raise ValueError(method)
    normalizers = _normalizers(model) if method == "hooks" else None
    if method == "hooks" and normalizers is None:
        method = "loop"  # some norm has no closed form here
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()
    totals = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    seen = 0
    try:
        for batch in batches:
            take = _batch_size(batch) if max_examples is None else min(_batch_size(batch), max_examples - seen)
            if take <= 0:
                break
            if take < _batch_size(batch):
                batch = {k: v[:take] for k, v in batch.items()} if isinstance(batch, dict) else batch[:take]
            if method == "hooks":
                sums = _hooks_step(model, batch, log_likelihood, params, normalizers)
            else:
                sums = _loop_step(model, batch, log_likelihood, params)
            for n, sq in sums.items():
                totals[n] += sq
            seen += take
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise SurgeryError("no examples to compute the Fisher information on")
    return {n: t / seen for n, t in totals.items()}


def _loop_step(model, batch, log_likelihood, params) -> dict[str, torch.Tensor]:
    """Sum over the batch's examples of squared gradients, one backward per example."""
    names, tensors = list(params), list(params.values())
    out = {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in params.items()}
    for i in range(_batch_size(batch)):
        ll = log_likelihood(model, _example(batch, i)).sum()
        for n, g in zip(names, torch.autograd.grad(ll, tensors, allow_unused=True)):
            if g is not None:
                out[n] += g.detach().double().cpu() ** 2
    return out


def _rms_normalize(eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """x / sqrt(mean(x^2) + eps) over the last axis, in float32 and cast back (as Llama's RMSNorm computes it)."""
    def normalize(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    return normalize


def _normalizers(model: nn.Module) -> dict[str, tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]] | None:
    """Per norm: (module, the map from its input to x_hat); None if some norm has no closed form here."""
    family = registry_family(model)
    out = {}
    for name, m in norm_modules(model).items():
        if isinstance(m, nn.LayerNorm):
            out[name] = m, lambda x, m=m: F.layer_norm(x, m.normalized_shape, eps=m.eps)
        elif isinstance(m, nn.RMSNorm):
            out[name] = m, lambda x, m=m: F.rms_norm(x, m.normalized_shape, eps=m.eps)
        elif family is not None and norm_kind(m) == "rmsnorm" and norm_eps(m) is not None:
            out[name] = m, _rms_normalize(norm_eps(m))
        else:
            return None
    return out


def _check_reconstruction(name: str, module: nn.Module, x_hat: torch.Tensor, output: torch.Tensor) -> None:
    """The closed form assumes y = x_hat * w (+ b); refuse a norm whose output is not that."""
    want = x_hat * module.weight if getattr(module, "weight", None) is not None else x_hat
    if getattr(module, "bias", None) is not None:
        want = want + module.bias
    out = output.detach()
    # the same elementwise arithmetic as the module's forward: equal up to a few roundings of the output's dtype
    tol = 16 * torch.finfo(out.dtype).eps * max(1.0, float(out.abs().max()))
    err = float((want.to(out.dtype) - out).abs().max())
    if err > tol:
        raise SurgeryError(
            f"the closed-form Fisher does not reproduce norm {name!r} ({type(module).__name__}): x_hat * weight + bias "
            f"differs from its output by {err:.3g}; compute the Fisher scores with method='loop'"
        )


def _hooks_step(model, batch, log_likelihood, params, normalizers) -> dict[str, torch.Tensor]:
    """Sum over the batch's examples of squared gradients, from one batched backward."""
    per_example: dict[str, torch.Tensor] = {}  # name -> (B, d) gradient of each example
    handles = []

    def capture(mod_name: str, module: nn.Module, normalize):
        def forward_hook(mod, inputs, output):
            x = inputs[0]
            with torch.no_grad():
                x_hat = normalize(x.detach())
                _check_reconstruction(mod_name, mod, x_hat, output)
            batch_dims = (x.shape[0], -1, x.shape[-1])

            def grad_hook(g):
                g = g.detach()
                for p_name, value in (("weight", g * x_hat), ("bias", g)):
                    full = f"{mod_name}.{p_name}" if mod_name else p_name
                    if full in params:
                        s = value.reshape(batch_dims).sum(1).double()
                        per_example[full] = per_example[full] + s if full in per_example else s

            if output.requires_grad:
                output.register_hook(grad_hook)

        return module.register_forward_hook(forward_hook)

    for mod_name, (module, normalize) in normalizers.items():
        handles.append(capture(mod_name, module, normalize))
    try:
        ll = log_likelihood(model, batch).sum()
        torch.autograd.grad(ll, list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {n: (per_example[n] ** 2).sum(0).cpu() if n in per_example else torch.zeros(p.shape, dtype=torch.float64)
            for n, p in params.items()}
