"""Export a model whose LayerNorms are all fake as a vanilla, LN-free `GPT2LMHeadModel`.

Each fake LN computes `(x - mean(x)) * (w / sigma) + b`. Its affine part is folded into the weights that
read it: ln_2 into `mlp.c_fc`, the two ln_1 copies into the query/key and the value columns of
`attn.c_attn`. What remains of ln_1 and ln_2 is pure centering, which vanilla GPT-2 expresses with the
large-eps trick: weight = SCALE, bias = 0, eps = SCALE**2, so LN(x) = (x - mean) / sqrt(1 + var / SCALE**2).
Its relative error is var / (2 SCALE**2): 5e-7 for a per-token std of 1e3. ln_f keeps its affine
(weight = SCALE * w_f / sigma_f, bias b_f) because GPT-2's unembedding is tied and has no bias to absorb it.
The config records `surgery_ln_free = {"scale": SCALE}`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GPT2LMHeadModel, PreTrainedModel

from surgery.errors import SurgeryError
from surgery.families import blocks, family_of, get_module
from surgery.remove_ln.points import find_points

SCALE = 1e6


def is_ln_free(model_or_config) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "surgery_ln_free", None) is not None


def _fold(conv: nn.Module, cols: slice, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Fold `o = c * weight + bias` into a Conv1D (y = o W + b) reading `o`, for columns `cols`."""
    W = conv.weight[:, cols]
    conv.bias[cols] += bias @ W
    conv.weight[:, cols] = weight[:, None] * W


def _make_centering(ln: nn.LayerNorm) -> None:
    ln.weight.fill_(SCALE)
    ln.bias.zero_()


@torch.no_grad()
def export_ln_free(model: PreTrainedModel) -> GPT2LMHeadModel:
    """A new vanilla GPT2LMHeadModel, in fp32, computing what `model` (prepared, all LNs fake) computes."""
    points = find_points(model)
    unfinished = [n for n, ln in points.items() if not ln.is_fake or ln.has_specials]
    if unfinished:
        raise SurgeryError(
            f"cannot export an LN-free model: {len(unfinished)} LayerNorm(s) are still real or use special "
            f"sigmas ({', '.join(unfinished[:4])}...); train past the schedule's last step (raise trainer.max_steps)"
        )
    fam = family_of(model)
    config = copy.deepcopy(model.config)
    config.layer_norm_epsilon = SCALE**2
    config.surgery_ln_free = {"scale": SCALE}
    out = GPT2LMHeadModel(config).float()
    source = model.state_dict()
    out.load_state_dict({k: source[k].float() for k in out.state_dict() if k in source}, strict=False)
    for i, block in enumerate(blocks(out)):
        split = get_module(blocks(model)[i], fam.attn_in)
        d = split.d
        c_attn = get_module(block, fam.attn_in)
        c_attn.weight.copy_(split.c_attn.weight)
        c_attn.bias.copy_(split.c_attn.bias)
        for ln, cols in ((points[f"h.{i}.ln_1_qk"], slice(0, 2 * d)), (points[f"h.{i}.ln_1_v"], slice(2 * d, 3 * d))):
            _fold(c_attn, cols, ln.weight.float() / ln.sigma, ln.bias.float())
        ln_2 = points[f"h.{i}.ln_2"]
        _fold(get_module(block, fam.mlp_in), slice(None), ln_2.weight.float() / ln_2.sigma, ln_2.bias.float())
        _make_centering(get_module(block, fam.attn_norm))
        _make_centering(get_module(block, fam.mlp_norm))
    ln_f, final = points["ln_f"], get_module(out, fam.final_norm)
    final.weight.copy_(SCALE * ln_f.weight.float() / ln_f.sigma)
    final.bias.copy_(ln_f.bias.float())
    out.tie_weights()
    return out.eval()
