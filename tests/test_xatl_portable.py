"""Saved hybrids load with `trust_remote_code=True` in a process where `surgery` cannot be imported: the code saved
beside the weights (surgery.xatl.hybrid.portable) needs torch and transformers only, and computes what the
hybrid computed when it was saved (logits to 1e-5: a fresh process may pick other CPU kernels; greedy tokens with
the cache equal)."""

import json
import subprocess
import sys

import pytest
import torch

from surgery.xatl.hybrid.portable import MODULES, portable_source
from surgery.xatl.mixers import MIXERS
from xatl_models import randomize_mixers, source_and_hybrid

# every mixer in a GPT-2 hybrid keeping attention in block 1; mamba2 also windowed, and from Pythia and Llama (GQA)
# with rotated windows that summarize older tokens (the generated tokens run past the windows)
ROTATED = {"window_summary": True, "window_rotary": True}
CASES = {**{f"gpt2-{m}": ("gpt2", m, {}) for m in sorted(MIXERS)},
         "gpt2-mamba2-window": ("gpt2", "mamba2", {"window": 4}),
         "neox-mamba2": ("neox", "mamba2", {"window": 4, **ROTATED}),
         "llama-mamba2": ("llama", "mamba2", {"n_kv_head": 2, "window": 3, **ROTATED})}

LOAD = """
import json, sys
sys.modules["surgery"] = None  # `import surgery` raises ImportError here
import torch
from transformers import AutoModelForCausalLM
root = sys.argv[1]
out = {}
for name in json.load(open(root + "/cases.json")):
    m = AutoModelForCausalLM.from_pretrained(f"{root}/{name}", trust_remote_code=True).eval()
    ids = torch.load(f"{root}/{name}/ids.pt")
    with torch.no_grad():
        torch.save(m(ids).logits, f"{root}/{name}/logits_remote.pt")
        gen = m.generate(ids[:, :5], max_new_tokens=6, do_sample=False)
    out[name] = {"type": type(m).__module__, "generated": gen.tolist()}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_mixer_reloads_with_trust_remote_code_without_surgery(tmp_path):
    expected = {}
    for name, (kind, mixer, options) in CASES.items():
        _, hyb = source_and_hybrid(kind, mixer, attn_layers=[1], options=options)
        randomize_mixers(hyb)
        hyb.save_pretrained(tmp_path / name)
        ids = torch.randint(0, hyb.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
        torch.save(ids, tmp_path / name / "ids.pt")
        with torch.no_grad():
            expected[name] = (hyb(ids).logits, hyb.generate(ids[:, :5], max_new_tokens=6, do_sample=False).tolist())
    (tmp_path / "cases.json").write_text(json.dumps(list(CASES)))
    res = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    remote = json.loads(res.stdout.strip().splitlines()[-1])
    for name, (logits, generated) in expected.items():
        assert remote[name]["type"].startswith("transformers_modules."), name  # the saved code, not the package
        got = torch.load(tmp_path / name / "logits_remote.pt")
        assert logits.abs().max() > 0.1
        torch.testing.assert_close(got, logits, rtol=0, atol=1e-5, msg=name)
        assert remote[name]["generated"] == generated, name


def test_travelling_modules_import_nothing_from_surgery_but_each_other():
    for module in MODULES:
        text = portable_source(module)
        assert "from surgery" not in text and "import surgery" not in text, module
    with pytest.raises(ValueError, match=r"^surgery\.xatl\.hybrid\.model imports surgery\.families, which is not saved "
                                         r"beside a hybrid: add it to surgery\.xatl\.hybrid\.portable\.MODULES"):
        portable_source("surgery.xatl.hybrid.model")
