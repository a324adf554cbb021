"""Copy the components a source model (GPT-2, GPT-NeoX/Pythia, Llama-style) shares with its hybrid twin:
embeddings, norms, MLPs (gated SwiGLU ones whole), LM head, whole attention layers the twin keeps, and
optionally attention weights into the mixers (W_O -> output projection; Q/K/V -> mixer inputs, the
Mamba-in-the-Llama mapping V -> x, K -> B, Q -> C for Mamba and Mamba-2; GPT-NeoX's per-head interleaved projection
de-interleaved and grouped KV heads repeated to the query heads, see surgery.xatl.transfer.qkv).

Module locations and projection layouts come from `surgery.families`; nothing here knows a family's attribute
names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.families import Family, blocks, family_of, get_module, norm_eps, set_norm_eps
from surgery.xatl.transfer.qkv import linear_parts, qkv_weights

COMPONENTS = ("embeddings", "norms", "mlp", "lm_head", "attn_layers", "attn_out", "qkv", "v")
DEFAULT_COMPONENTS = ("embeddings", "norms", "mlp", "lm_head", "attn_layers")


@dataclass
class TransferReport:
    """What was copied: one entry per copied tensor, {"target", "source", "params", "note", "whole"}
    ("whole": False when only some rows of the target parameter came from the source)."""

    copied: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def parameter_names(self) -> list[str]:
        """Target parameters wholly overwritten by source weights (the ones to freeze), in copy order."""
        partial = {c["target"] for c in self.copied if not c["whole"]}
        return list(dict.fromkeys(c["target"] for c in self.copied if c["target"] not in partial))

    @property
    def num_params(self) -> int:
        return sum(c["params"] for c in self.copied)

    def to_dict(self) -> dict:
        return {"num_params": self.num_params, "copied": self.copied, "notes": self.notes}

    def summary(self) -> str:
        return f"copied {len(self.copied)} tensors ({self.num_params:,} parameters)" + "".join(f"\n  {n}" for n in self.notes)


class _Copier:
    def __init__(self, target: nn.Module):
        self.names = {id(p): n for n, p in target.named_parameters(remove_duplicate=False)}
        self.report = TransferReport()

    @torch.no_grad()
    def copy(self, dst: torch.Tensor, src: torch.Tensor, src_name: str, note: str = "", dst_name: str = "") -> None:
        dst_name = dst_name or self.names.get(id(dst), "the target")
        if dst.shape != src.shape:
            raise SurgeryError(f"cannot copy {src_name} {tuple(src.shape)} into {dst_name} {tuple(dst.shape)}: "
                               "shapes differ" + (f" ({note})" if note else ""))
        dst.copy_(src)

    def record(self, dst_name: str, src_name: str, params: int, note: str = "", whole: bool = True) -> None:
        self.report.copied.append({"target": dst_name, "source": src_name, "params": params, "note": note,
                                   "whole": whole})

    def module(self, src: nn.Module, dst: nn.Module, src_path: str, dst_path: str) -> None:
        if type(src) is not type(dst):
            raise SurgeryError(f"cannot copy {src_path} ({type(src).__name__}) into {dst_path} ({type(dst).__name__})")
        dst_params = dict(dst.named_parameters())
        for name, p in src.named_parameters():
            self.copy(dst_params[name], p, f"{src_path}.{name}")
            self.record(f"{dst_path}.{name}", f"{src_path}.{name}", p.numel())

    def rows(self, dst: nn.Linear, rows: slice, w: torch.Tensor, b: torch.Tensor | None, dst_path: str,
             src_name: str, hint: str, how: str = "") -> None:
        """Copy a (out, in) weight and its bias into rows `rows` of a Linear; `how` notes a reshaping."""
        whole = rows == slice(0, dst.out_features)
        note = "; ".join(filter(None, [how, "" if whole else f"rows {rows.start}:{rows.stop} of {dst.out_features}"]))
        self.copy(dst.weight[rows], w, src_name, hint, f"{dst_path}.weight" + ("" if whole else f"[{note}]"))
        self.record(f"{dst_path}.weight", src_name, w.numel(), note, whole)
        if b is not None and dst.bias is not None:
            self.copy(dst.bias[rows], b, src_name + " bias", hint, f"{dst_path}.bias")
            self.record(f"{dst_path}.bias", src_name + " bias", b.numel(), note, whole)
        elif b is not None:
            self.report.notes.append(f"{src_name} bias not copied ({dst_path} has no bias)")


def _check_compatible(source: nn.Module, target: nn.Module, fs: Family, ft: Family) -> None:
    if ft.name not in (fs.name, "hybrid_" + fs.name):
        raise SurgeryError(f"cannot transfer from a {fs.name} model into a {ft.name} one: build the target from "
                           "the source config with hybrid_config_from")
    ws, wt = get_module(source, fs.tok_emb).embedding_dim, get_module(target, ft.tok_emb).embedding_dim
    if ws != wt:
        raise SurgeryError(f"source width {ws} differs from target width {wt}: transfer needs the same width "
                           "(build the target from the source config with hybrid_config_from)")
    ls, lt = len(blocks(source)), len(blocks(target))
    if ls != lt:
        raise SurgeryError(f"source has {ls} blocks, target {lt}: transfer needs the same depth")


def transfer_shared_weights(source: nn.Module, target: nn.Module,
                            components: tuple[str, ...] | list[str] = DEFAULT_COMPONENTS) -> TransferReport:
    """Copy `components` of `source` (a model of a supported family) into `target` (its hybrid twin, same
    width and depth: `hybrid_model(hybrid_config_from(source.config, ...))`) in place. Components: embeddings
    (token, and position where learned), norms (every norm; the source's epsilon and `surgery_ln_free` go
    along, so an LN-free source gives an LN-free target), mlp (every MLP projection), lm_head, attn_layers
    (attention blocks the target keeps, copied whole, rotary and grouped KV heads as they are), attn_out
    (attention output projection -> mixer output projection), qkv (Q/K/V in query-head order -> the mixer's
    input projections; see surgery.xatl.transfer.qkv), v (V alone -> the mixer's value / x input: for a Mamba whose
    d_state is too small for K -> B and Q -> C).
    Returns a TransferReport; raises SurgeryError on unknown components or mismatched shapes."""
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise SurgeryError(f"unknown transfer components {unknown}; choose from: {', '.join(COMPONENTS)}")
    fs, ft = family_of(source), family_of(target)
    if fs.twin_refusal:
        raise SurgeryError(f"cannot transfer from a {fs.name} model: {fs.twin_refusal}; transfer from a gpt2, "
                           "gpt_neox or llama model")
    _check_compatible(source, target, fs, ft)
    cp = _Copier(target)
    pairs = [(fs.tok_emb, ft.tok_emb)] + ([(fs.pos_emb, ft.pos_emb)] if fs.pos_emb and ft.pos_emb else [])
    if "embeddings" in components:
        for s, t in pairs:
            cp.module(get_module(source, s), get_module(target, t), s, t)
    if "norms" in components:
        _copy_norms(source, target, fs, ft, cp)
    if "lm_head" in components:
        _copy_lm_head(source, target, fs, ft, cp, "embeddings" in components)
    src_blocks, dst_blocks = blocks(source), blocks(target)
    for i, (sb, tb) in enumerate(zip(src_blocks, dst_blocks)):
        sp, tp = f"{fs.blocks}.{i}", f"{ft.blocks}.{i}"
        if "mlp" in components:
            cp.module(get_module(sb, fs.mlp), get_module(tb, ft.mlp), f"{sp}.{fs.mlp}", f"{tp}.{ft.mlp}")
        s_attn, t_attn = get_module(sb, fs.attn), get_module(tb, ft.attn)
        mixer = getattr(t_attn, "mixer", None)
        if mixer is None:
            if "attn_layers" in components:
                cp.module(s_attn, t_attn, f"{sp}.{fs.attn}", f"{tp}.{ft.attn}")
            continue
        slots, mpath = mixer.transfer_slots(), f"{tp}.{ft.attn}.mixer"
        hint = f"block {i} {type(mixer).__name__}: the mixer's shapes do not allow this mapping"
        if "attn_out" in components:
            w, b = linear_parts(get_module(sb, fs.attn_out))
            lin, rows = slots["o"]
            cp.rows(lin, rows, w, b, _name(mixer, lin, mpath), f"{sp}.{fs.attn_out}", hint)
        if "qkv" in components or "v" in components:
            keys = "qkv" if "qkv" in components else "v"
            parts = qkv_weights(sb, fs, source.config, sp, kv_heads=getattr(mixer, "n_kv_head", None))
            for key, (w, b, src_name, note) in parts.items():
                if key not in keys:
                    continue
                lin, rows = slots[key]
                cp.rows(lin, rows, w, b, _name(mixer, lin, mpath), src_name, hint, note)
    return cp.report


def _name(mixer: nn.Module, lin: nn.Module, prefix: str) -> str:
    return prefix + "." + next(n for n, m in mixer.named_modules() if m is lin)


def _copy_norms(source, target, fs: Family, ft: Family, cp: _Copier) -> None:
    src_paths = [f"{fs.blocks}.{i}.{n}" for i in range(len(blocks(source))) for n in (fs.attn_norm, fs.mlp_norm)]
    dst_paths = [f"{ft.blocks}.{i}.{n}" for i in range(len(blocks(target))) for n in (ft.attn_norm, ft.mlp_norm)]
    for s, t in zip(src_paths + [fs.final_norm], dst_paths + [ft.final_norm]):
        sm, tm = get_module(source, s), get_module(target, t)
        cp.module(sm, tm, s, t)
        eps = norm_eps(sm)
        if eps is not None and norm_eps(tm) != eps:
            set_norm_eps(tm, eps)
    eps = getattr(source.config, fs.eps_key, None)
    if eps is not None and getattr(target.config, ft.eps_key, eps) != eps:
        setattr(target.config, ft.eps_key, eps)
        cp.report.notes.append(f"norm epsilon set to the source's {eps:g}")
    ln_free = getattr(source.config, "surgery_ln_free", None)
    if ln_free is not None:
        target.config.surgery_ln_free = ln_free
        cp.report.notes.append(f"LN-free source: target marked surgery_ln_free={ln_free}")


def _copy_lm_head(source, target, fs: Family, ft: Family, cp: _Copier, embeddings_copied: bool) -> None:
    s_head, t_head = get_module(source, fs.lm_head), get_module(target, ft.lm_head)
    s_tied = s_head.weight is get_module(source, fs.tok_emb).weight
    t_tied = t_head.weight is get_module(target, ft.tok_emb).weight
    if not t_tied:
        cp.module(s_head, t_head, fs.lm_head, ft.lm_head)
    elif not (s_tied or torch.equal(s_head.weight, get_module(source, fs.tok_emb).weight)):
        raise SurgeryError("the source's LM head is not tied to its embeddings but the target's is: "
                           "build the target with tie_word_embeddings=False")
    elif not embeddings_copied:
        raise SurgeryError("the target's LM head is tied to its embeddings: transfer 'embeddings' with 'lm_head'")
    else:
        cp.report.notes.append(f"{ft.lm_head} is tied to {ft.tok_emb} (copied with the embeddings)")
