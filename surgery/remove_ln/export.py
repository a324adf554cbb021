"""Export a model whose norms are all fake as a vanilla, LN-free model of its own class
(`GPT2LMHeadModel`, `GPTNeoXForCausalLM`, `LlamaForCausalLM`, ...), loadable by plain transformers.

Each fake norm computes `c(x) * (w / sigma) + b`, with c the centering of a LayerNorm (identity for an
RMSNorm, which has no b) and w its gain (Gemma's `1 + weight`). Its affine part is folded into the projection
next to it (the family says which, `surgery.families.Family.block_norms`): a pre-norm into the projections that
read it (the MLP norm into the MLP's input projection(s), the two attention-norm copies into the query/key and the
value outputs of the attention input projection(s)); a norm on a projection's output (a QK-norm, a post-sublayer
norm) into that projection's output rows: `o_proj` / `down_proj` for post-norms, `q_proj` / `k_proj` for QK-norms,
each head's rows by its own sigma for a per-head QK-norm. What remains of each block norm is c alone, which the
vanilla class expresses with the large-epsilon trick: gain = SCALE, bias = 0, eps = SCALE**2, so
LN(x) = c(x) / sqrt(1 + var / SCALE**2) (RMSNorm: x / sqrt(1 + mean(x^2) / SCALE**2)); its relative error is
var / (2 SCALE**2), 5e-7 for a per-token std of 1e3. The final norm keeps its affine (weight SCALE * w_f / sigma,
bias b_f): a tied unembedding cannot absorb it and heads have no bias. The config records
`surgery_ln_free = {"scale": SCALE}` (informative: LN-free models are recognised from their weights).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PreTrainedModel

from surgery.errors import SurgeryError
from surgery.families import blocks, family_of, get_module, in_out_weight
from surgery.remove_ln.fake_ln import SwitchableLayerNorm
from surgery.remove_ln.points import KIND_ROLE, find_points

SCALE = 1e6


def marked_ln_free(model_or_config) -> bool:
    """Whether a model (or config) is marked LN-free by our export (`config.surgery_ln_free` set). A mark, not a
    measurement: `surgery.lens.convert.measured_ln_free` measures the norms themselves."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "surgery_ln_free", None) is not None


def _fold(proj: nn.Module, cols: torch.Tensor | slice, ln: SwitchableLayerNorm) -> None:
    """Fold a fake norm's `o = z * (w / sigma) + b` into the outputs `cols` of the projection `y = o W + c`."""
    W = in_out_weight(proj)  # (in, out); a view for nn.Linear, so writes reach the weight
    gain = ln.weight.float() / ln.sigma
    if ln.bias is not None:
        if proj.bias is None:
            raise SurgeryError(f"cannot fold a norm bias into a {type(proj).__name__} without a bias")
        proj.bias[cols] += ln.bias.float() @ W[:, cols]
    W[:, cols] = gain[:, None] * W[:, cols]


def _fold_output(proj: nn.Module, ln: SwitchableLayerNorm) -> None:
    """Fold a fake RMSNorm on the output of `y = x W + c` into the projection: y * (w / sigma) per output feature;
    for a per-head norm (sigma (heads,), w (d_head,)) each head's block of outputs by its own sigma."""
    gain = ln.weight.float()[None, :] / ln.sigma.reshape(-1, 1)  # (1 or heads, width of the norm)
    factor = gain.reshape(-1)
    W = in_out_weight(proj)
    if W.shape[1] != factor.numel():
        raise SurgeryError(f"cannot fold a norm of {factor.numel()} features into {W.shape[1]} projection outputs")
    W.mul_(factor[None, :])
    if proj.bias is not None:
        proj.bias.mul_(factor)


def _make_fixed(norm: nn.Module, offset: float) -> None:
    norm.weight.fill_(SCALE - offset)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()


@torch.no_grad()
def export_ln_free(model: PreTrainedModel) -> PreTrainedModel:
    """A new vanilla model of `model`'s class, in fp32, computing what `model` (prepared, all norms fake) computes."""
    points = find_points(model)
    unfinished = [n for n, ln in points.items() if not ln.is_fake or ln.has_specials]
    if unfinished:
        raise SurgeryError(
            f"cannot export an LN-free model: {len(unfinished)} norm(s) are still real or use special "
            f"sigmas ({', '.join(unfinished[:4])}...); train past the schedule's last step (raise trainer.max_steps)"
        )
    fam = family_of(model)
    config = copy.deepcopy(model.config)
    setattr(config, fam.eps_key, SCALE**2)
    config.surgery_ln_free = {"scale": SCALE}
    out = type(model)(config).float()
    prepared = dict(model.named_modules())
    for name, module in out.named_modules():  # every projection and embedding, wrapped or not in `model`
        source = prepared.get(name)
        source = getattr(source, "proj", source)
        for pname, param in module.named_parameters(recurse=False):
            if getattr(source, pname, None) is not None and not isinstance(source, SwitchableLayerNorm):
                param.copy_(getattr(source, pname).float())
    # where a norm's fixed affine goes, by role: the projections reading a pre-norm, the one a norm follows
    follows = {"q": fam.qkv[0], "k": fam.qkv[1] if len(fam.qkv) > 1 else None, "attn_out": fam.attn_out,
               "mlp_out": fam.mlp_out}
    for i, block in enumerate(blocks(out)):
        for kind in [k for k in KIND_ROLE if f"h.{i}.{k}" in points]:
            ln, role = points[f"h.{i}.{kind}"], KIND_ROLE[kind]
            if role == "mlp_in":
                for path in fam.mlp_in:
                    _fold(get_module(block, path), slice(None), ln)
            elif kind == "ln_1_qk" or kind == "ln_1_v":
                _fold_attn_input(block, fam, config, kind, ln)
            else:
                _fold_output(get_module(block, follows[role]), ln)
        for path in fam.block_norms().values():
            _make_fixed(get_module(block, path), fam.norm_gain_offset)
    ln_f, final = points["ln_f"], get_module(out, fam.final_norm)
    final.weight.copy_(SCALE * ln_f.weight.float() / ln_f.sigma - fam.norm_gain_offset)
    if ln_f.bias is not None:
        final.bias.copy_(ln_f.bias.float())
    out.tie_weights()
    return out.eval()


def _fold_attn_input(block: nn.Module, fam, config, kind: str, ln: SwitchableLayerNorm) -> None:
    """Fold one copy of the attention pre-norm into the outputs of the attention input projection(s) it feeds."""
    if fam.qkv_layout == "separate":
        for path in (fam.qkv[:2] if kind == "ln_1_qk" else fam.qkv[2:]):
            _fold(get_module(block, path), slice(None), ln)
        return
    values = fam.value_outputs(config)
    cols = ~values if kind == "ln_1_qk" else values
    _fold(get_module(block, fam.qkv[0]), torch.nonzero(cols).squeeze(1), ln)
