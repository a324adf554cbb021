"""Checks on the LN-free exports of finished removal runs, beyond what each run measured itself.

For each run directory (`surgery fit --config recipes/remove_ln/quickstart*.yaml`):
- trained vs export: the run's own `export_logit_diff` (fake-norm model vs its export, in one process);
- vanilla reload: `<run>/model` loaded by plain transformers in a fresh process that never imports surgery; its
  class and its logits on validation blocks against the export's logits in this process (max relative diff);
- affine norms: every norm module left in the export, fed the export's own residual inputs scaled by
  1e-2 ... 1e3, returns its output at scale 1 scaled the same (bias removed); the largest relative deviation;
- DLA: embeddings + every attention and MLP output through the final (linear) norm and the head sum to the logits
  (largest deviation relative to the largest logit), from forward hooks on the Hugging Face model.

    python -m benchmarks.export_checks runs/remove_ln/qs-pythia-s0 runs/remove_ln/qs-llama-s0 --out benchmarks/ln_free_exports
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from surgery.families import blocks, family_of, get_module

SCALES = (1e-2, 1e-1, 10.0, 1e2, 1e3)


def _vanilla_logits(model_dir: Path, ids: torch.Tensor) -> tuple[str, torch.Tensor]:
    script = (
        "import json, sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}).eval()\n"
        f"ids = torch.tensor({ids.tolist()})\n"
        "with torch.no_grad(): out = m(ids).logits\n"
        "assert not [n for n in sys.modules if n.split('.')[0] == 'surgery']\n"
        "print(json.dumps({'cls': type(m).__name__, 'logits': out.tolist()}))\n"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout)
    return res["cls"], torch.tensor(res["logits"])


@torch.no_grad()
def check(run: Path, n_blocks: int = 2, length: int = 128) -> dict:
    from transformers import AutoModelForCausalLM

    from surgery.data.datamodule import TokenBlocks

    model = AutoModelForCausalLM.from_pretrained(str(run / "model")).eval()
    dm = TokenBlocks(data="stdlib", tokenizer=str(run / "model"), block_size=length, batch_size=n_blocks)
    ids = torch.stack([dm.split("validation")[i] for i in range(n_blocks)])
    fam = family_of(model)
    norms = [m for m in model.modules() if "Norm" in type(m).__name__]
    inputs: dict[int, torch.Tensor] = {}
    parts: list[torch.Tensor] = []
    hooks = [n.register_forward_pre_hook(lambda m, a: inputs.setdefault(id(m), a[0])) for n in norms]
    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda m, a, out: parts.append(out)))
    if fam.pos_emb:
        hooks.append(get_module(model, fam.pos_emb).register_forward_hook(lambda m, a, out: parts.append(out.expand(ids.shape[0], -1, -1))))
    for block in blocks(model):
        for path in (fam.attn_out, fam.mlp_out):
            hooks.append(get_module(block, path).register_forward_hook(lambda m, a, out: parts.append(out)))
    logits = model(ids).logits
    for h in hooks:
        h.remove()
    cls, reloaded = _vanilla_logits(run / "model", ids)
    worst = 0.0
    for n in norms:
        x = inputs[id(n)]
        bias = getattr(n, "bias", None)
        base = n(x) - (0 if bias is None else bias)
        for c in SCALES:
            got = n(c * x) - (0 if bias is None else bias)
            worst = max(worst, ((got - c * base).abs().max() / (c * base).abs().max()).item())
    final = get_module(model, fam.final_norm)
    head = model.get_output_embeddings()
    f_bias = getattr(final, "bias", None)
    linear = [final(p) - (0 if f_bias is None else f_bias) for p in parts]  # each part through the linear part of the final norm
    dla = head(sum(linear) + (0 if f_bias is None else f_bias))
    metrics = json.loads((run / "metrics.json").read_text())
    return {"run": str(run), "class": cls, "norms": len(norms),
            "trained_vs_export_rel": metrics["export_logit_diff"]["relative"],
            "vanilla_reload_rel": ((reloaded - logits).abs().max() / logits.abs().max()).item(),
            "norm_affine_worst_rel": worst, "parts": len(parts),
            "dla_rel": ((dla - logits).abs().max() / logits.abs().max()).item()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = [check(r) for r in args.runs]
    lines = ["| run | class | norms | trained vs export | vanilla reload | norm affinity (1e-2…1e3) | DLA sum |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['class']} | {r['norms']} | {r['trained_vs_export_rel']:.1e} | {r['vanilla_reload_rel']:.1e} | "
              f"{r['norm_affine_worst_rel']:.1e} | {r['dla_rel']:.1e} |" for r in rows]
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("Relative differences (max |difference| / max |logit|, or per norm output).\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
