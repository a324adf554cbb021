"""What LayerNorm gives attention (Brody, Alon & Yahav 2023, "On the Expressivity Role of LayerNorm in
Transformers' Attention"), measured on a model and its baseline by `surgery verify`.

The paper reads a LayerNorm before attention as two steps, each an ability:
(a) projection onto the hyperplane orthogonal to the all-ones vector (the centering): with every input orthogonal
    to one direction, a query can score all keys equally, attending to all of them uniformly;
(b) scaling every input to the same norm: the inputs lie on a sphere, where no point is inside the convex hull of
    the others, so every key can get the strictly highest score from some query ("selectable"). A key inside the
    hull of the other keys of its sequence never can: q.k_j = sum_i lambda_i q.k_i <= max_i q.k_i for every q.
An LN-free export keeps (a) where the family's norm centers (LayerNorm: GPT-2, GPT-NeoX; an RMSNorm never does)
and gives up (b).

Measured per layer (lists of n_layers floats, float64):
- `unselectable_share` on the Hugging Face model's keys, decided exactly by a linear program per key (SciPy's
  `linprog`, HiGHS);
- `all_ones_components` on the Hugging Face model, at the attention norm's input and at its output without the
  affine (the norm's own forward with gain 1 and bias 0);
- `attention_entropy_heads` on TransformerLens' `hook_pattern` (the attention probabilities the sink checks use).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog
from torch.func import functional_call

from surgery.families import blocks as model_blocks
from surgery.families import family_of, get_module

HULL_TOKENS = 64  # keys per sequence in the convex-hull test (the first tokens of a held-out block)
HULL_SEQUENCES = 2  # sequences (held-out blocks) in the convex-hull test


def in_convex_hull(point: np.ndarray, others: np.ndarray) -> bool | None:
    """Whether `point` (d,) is a convex combination of the rows of `others` (n, d): the linear program
    find lambda (n,) >= 0 with sum(lambda) = 1 and lambda @ others = point (zero objective; feasible means inside),
    solved by `scipy.optimize.linprog` (HiGHS, feasibility tolerance 1e-7 absolute: pass coordinates of order 1).
    None when HiGHS decides neither way (numerical difficulties)."""
    n = others.shape[0]
    if n == 0:
        return False
    a_eq = np.vstack([others.T, np.ones((1, n))])
    b_eq = np.append(point, 1.0)
    result = linprog(np.zeros(n), A_eq=a_eq, b_eq=b_eq, bounds=(0, None), method="highs")
    return {0: True, 2: False}.get(result.status)  # 0: a feasible lambda found; 2: proven infeasible


def unselectable_keys(keys: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(bool (n,): key j lies in the convex hull of the other n - 1 keys, so no query gives it the strictly highest
    score; the number of keys HiGHS left undecided, counted False) for the keys (n, d_head) of one head and one
    sequence. The keys are first centered on their mean and divided by the largest norm (hull membership does not
    change under a translation and a common scale), so the LP's 1e-7 tolerance is relative to the keys' spread.
    A key that some query scores strictly above every other key is selectable without a linear program (that query is
    the proof; `_won_a_query` tries each key's own direction and fixed random ones); only the others are decided by
    `in_convex_hull`.
    Note that n <= d_head + 1 keys in general position are all selectable: the test says something only for
    longer sequences."""
    k = keys.detach().double().cpu().numpy()
    k = k - k.mean(0)
    k = k / max(float(np.linalg.norm(k, axis=1).max()), 1e-300)
    inside, undecided = torch.zeros(len(k), dtype=torch.bool), 0
    for j in np.flatnonzero(~_won_a_query(k)):  # a key some query scores strictly highest is selectable; the rest: LP
        verdict = in_convex_hull(k[j], np.delete(k, j, axis=0))
        undecided += verdict is None
        inside[j] = bool(verdict)
    return inside, undecided


def _won_a_query(k: np.ndarray, n_random: int = 4096) -> np.ndarray:
    """bool (n,): key k_j scores strictly highest (margin 1e-9) for one of the queries tried: its own direction, or
    one of `n_random` Gaussian directions (seeded: the same every call). True is a proof of selectability; False
    decides nothing."""
    queries = np.vstack([k, np.random.default_rng(0).standard_normal((n_random, k.shape[1]))])
    scores = queries @ k.T  # (queries, keys)
    top = scores.argmax(1)
    margin = scores[np.arange(len(scores)), top] - np.partition(scores, -2, axis=1)[:, -2]
    won = np.zeros(len(k), dtype=bool)
    won[top[margin > 1e-9]] = True
    return won


@torch.no_grad()
def attention_keys(hf_model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the keys (batch, n_kv_heads, pos, d_head) as the model's attention scores them: after the rotary
    embedding in rotary families, one set per key/value head under grouped-query attention. Read from the key cache
    of one forward pass on `tokens` (batch, pos): transformers caches keys after rotating them."""
    out = hf_model(tokens, use_cache=True)
    cache = out["cache"] if "cache" in out else out["past_key_values"]  # the output's name from transformers 5.24
    return [layer.keys for layer in cache.layers]


def unselectable_share(hf_model, tokens: torch.Tensor) -> dict:
    """Per (layer, key head): the share of unselectable keys (`unselectable_keys`) among all keys of each sequence
    of `tokens` (batch, pos), averaged over the sequences; `per_layer` averages over the key heads."""
    keys = attention_keys(hf_model, tokens)
    per_head, undecided = [], 0
    for layer_keys in keys:  # (batch, kv_heads, pos, d_head)
        shares = torch.zeros(layer_keys.shape[1], dtype=torch.float64)
        for seq in layer_keys:
            for h, head_keys in enumerate(seq):
                inside, left = unselectable_keys(head_keys)
                shares[h] += inside.double().mean() / len(layer_keys)
                undecided += left
        per_head.append(shares)
    batch, kv_heads, pos, d_head = keys[0].shape
    return {"per_layer": [s.mean().item() for s in per_head], "per_head": [s.tolist() for s in per_head],
            "sequences": batch, "keys_per_sequence": pos, "key_heads": kv_heads, "d_head": d_head, "undecided": undecided}


def all_ones_component(x: torch.Tensor) -> torch.Tensor:
    """|mean over channels of x| * sqrt(d) / ||x|| for each vector of x (..., d), float64: the |cosine| between x
    and the all-ones vector, in [0, 1] (0 for x = 0). 0 to float precision after a LayerNorm's centering."""
    x = x.double()
    return x.mean(-1).abs() * x.shape[-1] ** 0.5 / x.norm(dim=-1).clamp_min(1e-300)


def _without_affine(norm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that make a norm's affine the identity: every `weight` 1, every `bias` 0."""
    return {name: (torch.ones_like(p) if name == "weight" else torch.zeros_like(p))
            for name, p in norm.named_parameters(recurse=False) if name in ("weight", "bias")}


@torch.no_grad()
def all_ones_components(hf_model, tokens: torch.Tensor) -> dict:
    """Per layer, `all_ones_component` averaged over every token of `tokens` (batch, pos), at two points:
    `block_input`: the attention norm's input (the family's `attn_norm`), which in every supported family is the
    residual stream entering the block (attention's own input where there is no pre-norm, OLMo 2: then
    `attention_input` is the same); `attention_input`: that norm's output before its affine, the norm module's
    own forward with gain 1 and bias 0 (`torch.func.functional_call`): LayerNorm (x - mean) / sqrt(var + eps),
    RMSNorm x / sqrt(mean(x^2) + eps), with the norm's own eps (an LN-free export's 1e12 included), so for an LN-free
    export the fixed centering (LayerNorm families) or nothing (RMSNorm) that remains of the norm."""
    fam = family_of(hf_model)
    if fam.attn_norm is None:  # no pre-norm (OLMo 2): attention reads the residual stream itself
        attns = [get_module(block, fam.attn) for block in model_blocks(hf_model)]
        inputs = _pre_inputs(hf_model, attns, tokens)
        block_input = [all_ones_component(inputs[i]).mean().item() for i in range(len(attns))]
        return {"block_input": block_input, "attention_input": list(block_input)}
    norms = [get_module(block, fam.attn_norm) for block in model_blocks(hf_model)]
    inputs = _pre_inputs(hf_model, norms, tokens)
    block_input = [all_ones_component(inputs[i]).mean().item() for i in range(len(norms))]
    attention_input = [all_ones_component(functional_call(norm, _without_affine(norm), (inputs[i],))).mean().item()
                       for i, norm in enumerate(norms)]
    return {"block_input": block_input, "attention_input": attention_input}


def _pre_inputs(hf_model, modules: list, tokens: torch.Tensor) -> dict[int, torch.Tensor]:
    """{i: the input (first positional argument, else `hidden_states`) of modules[i] in one forward of `tokens`}."""
    inputs: dict[int, torch.Tensor] = {}

    def hook(i):
        def record(module, args, kwargs) -> None:
            inputs.setdefault(i, args[0] if args else kwargs["hidden_states"])

        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        hf_model(tokens)
    finally:
        for h in handles:
            h.remove()
    return inputs


def relative_attention_entropy(pattern: torch.Tensor) -> torch.Tensor:
    """H(row t) / log(t + 1) for each query t >= 1 of a causal attention pattern (..., query, key) (query t attends
    keys 0..t; H in nats): (..., query - 1), float64; 1 for uniform attention over the keys a query sees, 0 for
    attention on one key. Position 0 sees one key and is left out."""
    p = pattern.double()
    h = -torch.special.xlogy(p, p).sum(-1)[..., 1:]
    return h / torch.arange(2, p.shape[-2] + 1, dtype=torch.float64).log()


@torch.no_grad()
def attention_entropy_heads(hooked, tokens: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_heads): `relative_attention_entropy` averaged over the sequences of `tokens` (batch, pos) and
    the queries t >= 1, from TransformerLens' `blocks.{l}.attn.hook_pattern` (batch, head, query, key)."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(hooked.cfg.n_layers)]
    _, cache = hooked.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([relative_attention_entropy(cache[n]).mean((0, 2)) for n in names])


def expressivity(hf_model, hooked, tokens: torch.Tensor, hull_tokens: int = HULL_TOKENS,
                 hull_sequences: int = HULL_SEQUENCES) -> dict:
    """The three measurements on held-out `tokens` (batch, pos): unselectable keys on the first `hull_sequences`
    sequences, cut to their first `hull_tokens` tokens; the all-ones component and the attention entropy on all of
    `tokens`."""
    entropy = attention_entropy_heads(hooked, tokens)
    return {
        "unselectable_keys": unselectable_share(hf_model, tokens[:hull_sequences, :hull_tokens]),
        "all_ones_component": all_ones_components(hf_model, tokens),
        "attention_entropy": {"per_layer": entropy.mean(1).tolist(), "per_head": entropy.tolist()},
    }


DEFINITIONS = """\
LayerNorm's two roles in attention (Brody, Alon & Yahav 2023; `surgery.lens.expressivity`):
- `unselectable key share`: per layer, the share of keys that lie in the convex hull of the other keys of their
  sequence, averaged over key heads (a grouped-query model's key/value heads) and sequences. Such a key can never
  get the strictly highest attention score: q.k_j = sum_i lambda_i q.k_i <= max_i q.k_i for every query q. Keys
  as the HF model's attention scores them (after the rotary embedding in rotary families), read from the key
  cache of one forward pass. The set: all keys of a sequence, the set its last query attends to (causal attention
  lets query t see keys 0..t only), on the first `hull_sequences` DLA blocks cut to their first `hull_tokens`
  tokens (the settings above). Decided exactly for each key k_j by a linear program
  (`scipy.optimize.linprog`, HiGHS): find lambda >= 0 with sum_i lambda_i = 1 and sum_i lambda_i k_i = k_j over
  i != j; feasible => unselectable. The keys are centered and divided by their largest norm first (membership is
  unchanged; HiGHS' feasibility tolerance 1e-7 is then relative to their spread). Keys HiGHS cannot decide count
  as selectable (`undecided` in report.json). With n <= d_head + 1 keys in general position every key is
  selectable, so the share is informative only for n > d_head + 1 (`keys_per_sequence`, `d_head` in report.json).
- `all-ones component`: per layer, |mean_c x| sqrt(d) / ||x|| (the |cosine| between x and the all-ones vector)
  averaged over every token of the DLA blocks, at two points: `block input`, x = the input of the attention norm
  (the residual stream entering the block); `attention input`, x = that norm's output before its gain and bias
  (the norm module run with gain 1 and bias 0, its own eps): LayerNorm (x - mean) / sqrt(var + eps), RMSNorm
  x / sqrt(mean(x^2) + eps). For an LN-free export the same point: what remains of the norm, its fixed centering
  (LayerNorm families; 0 to float precision, as for a real LayerNorm) or nothing (RMSNorm; then equal to the
  block input).
- `attention entropy / uniform`: per layer, H(p_t) / log(t + 1) averaged over heads, queries t >= 1 and the DLA
  blocks, p_t the attention of query t over keys 0..t (TransformerLens' `hook_pattern`, as the sink mass), H in
  nats; 1 is uniform attention over the keys a query sees, 0 attention on one key; position 0 sees one key and is
  left out.
"""
