"""Shared depth: a pretrained model whose layers share a few blocks' weights (WideNet; Relaxed Recursive Transformers).

`share_depth(model, ShareConfig(...))` turns a plain Hugging Face causal LM of any family in `surgery.families` into
its shared-depth twin (model type `shared_<type>`, `surgery.share.model`): groups of layers read one block's
attention and MLP weights, each layer keeps its own norms (or shares them), optionally with per-layer low-rank
deltas (relaxation) and a mixture-of-experts MLP made from the original MLPs. `expand(model)` writes the weights
out per layer as the family's vanilla class. `surgery.share.module.DepthSharing` trains it from the original as a
teacher (`surgery fit --config recipes/share/...`).
"""

from surgery.share.build import ShareConfig, expand, share_depth, unique_parameters

__all__ = ["ShareConfig", "expand", "share_depth", "unique_parameters"]
