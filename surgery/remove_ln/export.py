"""Export a model whose norms are all fake as a vanilla, LN-free model of its own class
(`GPT2LMHeadModel`, `GPTNeoXForCausalLM`, `LlamaForCausalLM`, ...), loadable by plain transformers.

Each fake norm computes `c(x) * (w / sigma) + b`, with c the centering of a LayerNorm (identity for an
RMSNorm, which has no b). Its affine part is folded into the projections that read it (the family says which:
the MLP norm into the MLP's input projection(s), the two attention-norm copies into the query/key and the value
outputs of the attention input projection(s)). What remains of each block norm is c alone, which the vanilla
class expresses with the large-epsilon trick: weight = SCALE, bias = 0, eps = SCALE**2, so
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
from surgery.remove_ln.points import find_points

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


def _make_fixed(norm: nn.Module) -> None:
    norm.weight.fill_(SCALE)
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
    for i, (block, src) in enumerate(zip(blocks(out), blocks(model))):
        ln_qk, ln_v, ln_2 = points[f"h.{i}.ln_1_qk"], points[f"h.{i}.ln_1_v"], points[f"h.{i}.ln_2"]
        if fam.qkv_layout == "separate":
            for path, ln in zip(fam.qkv, (ln_qk, ln_qk, ln_v)):
                _fold(get_module(block, path), slice(None), ln)
        else:
            values = fam.value_outputs(config)
            proj = get_module(block, fam.qkv[0])
            _fold(proj, torch.nonzero(~values).squeeze(1), ln_qk)
            _fold(proj, torch.nonzero(values).squeeze(1), ln_v)
        for path in fam.mlp_in:
            _fold(get_module(block, path), slice(None), ln_2)
        _make_fixed(get_module(block, fam.attn_norm))
        _make_fixed(get_module(block, fam.mlp_norm))
    ln_f, final = points["ln_f"], get_module(out, fam.final_norm)
    final.weight.copy_(SCALE * ln_f.weight.float() / ln_f.sigma)
    if ln_f.bias is not None:
        final.bias.copy_(ln_f.bias.float())
    out.tie_weights()
    return out.eval()
