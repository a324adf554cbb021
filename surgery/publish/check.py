"""The reload check run before anything is uploaded: the assembled folder must load and compute what the run's
model computes.

The folder is loaded with plain `transformers` (`AutoModelForCausalLM.from_pretrained`) in a separate Python
process that never imports `surgery`, as a user of the published repository would load it; its logits on a few
blocks of token ids are compared with those of the run's own model directory, loaded here. GPT-2 models are also
loaded with `surgery.lens.load_hooked` (TransformerLens; an LN-free model with no normalization) and compared.
Architectures that only exist in this package (the XATL hybrids) are loaded in-process after importing it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from surgery.errors import SurgeryError
from surgery.families import context_length_of

# Max |logit difference| allowed, relative to max |logit| (floor 1). The same weights reloaded give 0 in one
# process; across processes thread counts may change the summation order (~1e-6 relative in fp32), and
# TransformerLens' folded LN-free weights differ by rounding (~1e-6; surgery verify accepts 1e-4 absolute).
TOLERANCE = 1e-4

_PLAIN_LOAD = r"""
import sys, torch, transformers
folder, tokens_path, out_path, auto_class = sys.argv[1:5]
model = getattr(transformers, auto_class).from_pretrained(folder).float().eval()
tokens = torch.load(tokens_path)
with torch.no_grad():
    logits = model(tokens).logits
leaked = sorted(m for m in sys.modules if m == "surgery" or m.startswith("surgery."))
torch.save({"logits": logits, "class": type(model).__name__, "leaked": leaked}, out_path)
"""


def auto_class(config: dict) -> str:
    """The transformers Auto class that loads this config's architecture."""
    arch = (config.get("architectures") or [""])[0]
    return "AutoModelForSequenceClassification" if arch.endswith("ForSequenceClassification") else "AutoModelForCausalLM"


def needs_surgery(config: dict) -> bool:
    """True when transformers alone does not know the model type (an architecture registered by this package)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return config.get("model_type") not in CONFIG_MAPPING_NAMES


def probe_tokens(config: dict, blocks: int = 4, block_size: int = 64, seed: int = 0) -> torch.Tensor:
    """(blocks, min(block_size, context)) token ids, uniform over the vocabulary, from a fixed seed. `config` is a
    config.json dict; a hybrid's model type, unknown to the registry until `surgery.xatl` is imported, is read through
    the context fields of every family (`surgery.families.context_length_of`)."""
    context = context_length_of(SimpleNamespace(**config)) or block_size
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, config["vocab_size"], (blocks, min(block_size, context)), generator=gen)


@torch.no_grad()
def _logits_in_process(model_dir: Path, tokens: torch.Tensor, auto: str) -> torch.Tensor:
    import transformers

    if needs_surgery({"model_type": transformers.AutoConfig.from_pretrained(model_dir).model_type}):
        import surgery.xatl  # noqa: F401  (registers hybrid_gpt2 with the Auto classes)
    model = getattr(transformers, auto).from_pretrained(model_dir).float().eval()
    return model(tokens).logits.float()


def plain_transformers_logits(folder: Path, tokens: torch.Tensor, auto: str, timeout: float = 600) -> torch.Tensor:
    """Logits of `folder` loaded by `transformers.<auto>.from_pretrained` in a fresh process without `surgery`."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path, out_path = Path(tmp) / "tokens.pt", Path(tmp) / "logits.pt"
        torch.save(tokens, tokens_path)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(folder), str(tokens_path), str(out_path), auto],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise SurgeryError(f"the assembled folder {folder} does not load with plain transformers "
                               f"({auto}.from_pretrained); nothing was published:\n{tail}")
        result = torch.load(out_path)
    if result["leaked"]:
        raise SurgeryError(f"loading {folder} with plain transformers imported {result['leaked']}")
    return result["logits"].float()


def _compare(what: str, ref: torch.Tensor, got: torch.Tensor) -> float:
    if ref.shape != got.shape:
        raise SurgeryError(f"{what}: logits of shape {tuple(got.shape)}, the run's model gives {tuple(ref.shape)}; nothing was published")
    diff = (ref - got).abs().max().item()
    limit = TOLERANCE * max(1.0, ref.abs().max().item())
    if not diff <= limit:
        raise SurgeryError(f"{what}: logits differ from the run's model by up to {diff:.3g} (allowed {limit:.3g}); "
                           "the assembled folder does not reproduce the run, so nothing was published")
    return diff


def check_folder(folder: Path, model_dir: Path, config: dict) -> dict:
    """Reload `folder` and compare its logits with `model_dir`'s. Raises SurgeryError on any mismatch.

    Returns {"loader", "blocks", "block_size", "max_abs_logit_diff", ["lens_max_abs_logit_diff"]}.
    """
    auto = auto_class(config)
    tokens = probe_tokens(config)
    ref = _logits_in_process(model_dir, tokens, auto)
    if needs_surgery(config):
        got = _logits_in_process(folder, tokens, auto)
        loader = f"with `transformers.{auto}` after `import surgery.xatl`"
    else:
        got = plain_transformers_logits(folder, tokens, auto)
        loader = f"with plain `transformers.{auto}` in a process without `surgery`"
    result = {"loader": loader, "blocks": tokens.shape[0], "block_size": tokens.shape[1],
              "max_abs_logit_diff": _compare(f"{folder} loaded with {auto}", ref, got)}
    from surgery.lens.convert import lens_supports

    if lens_supports(config.get("model_type")):
        from surgery.lens import load_hooked

        with torch.no_grad():
            lens = load_hooked(str(folder))(tokens).float()
        result["lens_max_abs_logit_diff"] = _compare(f"{folder} loaded with surgery.lens.load_hooked", ref, lens)
    return result
