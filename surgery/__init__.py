"""surgery: architecture surgery for transformer language models.

Importing the package registers the hybrid model types (`hybrid_gpt2`, `hybrid_gpt_neox`, `hybrid_llama`, ...)
with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained` loads a saved hybrid after a plain `import surgery`.
"""

__version__ = "0.1.0"

import surgery.xatl.hybrid.model  # noqa: E402,F401  (registration with the Auto classes)
