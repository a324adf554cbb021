"""The model card (`README.md`) of a published run: Hub metadata, results tables from the run's own
measurements (`metrics.json`, the verification report), the reload check, and loading snippets.

Every number in the tables is read from the run's files; nothing is typed in by hand. The results table starts with
the rows the run printed when it ended (each surgery's `result_rows`, see `surgery.training.report`).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from surgery.lens.convert import lens_supports
from surgery.publish.source import PublishSource
from surgery.training.report import num

CORPUS_NAMES = {"stdlib"}  # data sources of surgery.data.Corpus that are not Hub datasets


def is_hub_name(name, search_dirs: list[Path]) -> bool:
    """True when `name` reads as a Hub repository id and is not a local path (relative to any of `search_dirs`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not name or name.endswith(".ckpt") or name.startswith(("/", ".", "~")):
        return False
    if name.count("/") > 1 or any((d / name).exists() for d in search_dirs):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _search_dirs(source: PublishSource) -> list[Path]:
    """Where a relative path in an older run's recipe may be relative to: the current directory, the run
    directory's parents and the directory this package lies in (e.g. the clone holding checkpoints/)."""
    dirs = [Path.cwd(), Path(__file__).resolve().parents[2]]
    if source.run_dir is not None:
        dirs += list(source.run_dir.resolve().parents)
    return dirs


def _resolved(source: PublishSource, key: str) -> tuple[bool, str | None]:
    """(known, Hub name) from what the run recorded in metrics.json while it trained (`surgery.training.run.sources`):
    a name that resolved to a local path then is never a Hub id, wherever the run directory lies now."""
    entry = source.metrics.get(key)
    if not isinstance(entry, dict) or "local_path" not in entry:
        return False, None
    name = entry.get("name")
    return True, (name if entry["local_path"] is None and is_hub_name(name, []) else None)


def base_model(source: PublishSource) -> str | None:
    """The Hub model the run started from (`model.init_args.init` or `.source` of the recipe), if it is one."""
    known, name = _resolved(source, "started_from")
    if known:
        return name
    args = (source.recipe.get("model") or {}).get("init_args") or {}
    name = args.get("init") or args.get("source")
    return name if is_hub_name(name, _search_dirs(source)) else None


def datasets(source: PublishSource) -> list[str]:
    """Hub datasets the run trained on (`data.init_args.data` of the recipe); local files and 'stdlib' are not listed."""
    known, name = _resolved(source, "trained_on")
    if not known:
        args = (source.recipe.get("data") or {}).get("init_args") or {}
        name = args.get("data")
        name = name if is_hub_name(name, _search_dirs(source)) else None
    return [name] if name is not None and name not in CORPUS_NAMES else []


def metadata(source: PublishSource, ln_free: bool, license: str, base: str | None, data: list[str]) -> dict:
    """The YAML front matter of the card."""
    config = source.model_config
    model_type = config.get("model_type", "")
    tags = ["lm-surgery"] + ([model_type] if model_type else [])
    if ln_free:
        tags += ["ln-free", "layernorm-removal"]
    if lens_supports(model_type):
        tags.append("transformer-lens")
    if "xatl" in source.metrics:
        tags += ["xatl", f"{source.metrics['xatl'].get('mixer', 'hybrid')}"]
    if "ln_tune" in source.metrics or str(source.metrics.get("method", "")).startswith("ln"):
        tags.append("ln-tuning")
    archs = config.get("architectures") or [""]
    pipeline = "text-classification" if archs[0].endswith("ForSequenceClassification") else "text-generation"
    meta = {"library_name": "transformers", "license": license, "pipeline_tag": pipeline, "tags": tags}
    if base:
        meta["base_model"] = base
    if data:
        meta["datasets"] = data
    return meta


def surgery_rows(metrics: dict) -> list[tuple[str, str]]:
    """The rows the run printed when it ended, built by its surgery from the same metrics.json: each leads with
    the gap to the model it started from (removal: then the bracket gap and the gap to the control) and gives
    the validation tokens behind each figure. Empty for a run of no surgery (e.g. pretraining)."""
    if isinstance(metrics.get("val_loss"), dict):  # LayerNorm removal
        from surgery.remove_ln.report import result_rows
    elif isinstance(metrics.get("xatl"), dict):  # cross-architecture transfer
        from surgery.xatl.training.report import result_rows
    elif isinstance(metrics.get("ln_tune"), dict):  # LN-tuning of a language model
        from surgery.ln_tune.lm import result_rows
    elif isinstance(metrics.get("share"), dict):  # shared depth
        from surgery.share.report import result_rows
    elif "test_accuracy" in metrics:  # sequence classification
        from surgery.ln_tune.classify import result_rows
    else:
        return []
    return result_rows(metrics)


def result_rows(metrics: dict, parent: dict) -> list[tuple[str, str]]:
    """(measurement, value) rows from a run's metrics.json (and a comparison's metrics.json one level up)."""
    rows = surgery_rows(metrics)
    val = metrics.get("val")
    if isinstance(val, dict) and not isinstance(metrics.get("val_loss"), dict):
        if not rows:
            rows.append(("validation loss (nats/token)", num(val["loss"])))
        rows.append(("validation perplexity", num(val["perplexity"])))
    if "steps_to_match_ratio" in parent:  # XATL vs scratch comparison (surgery/cli/commands/compare.py)
        rows.append(("scratch final validation loss (nats/token)", num(parent.get("scratch_final_val_loss"))))
        rows.append(("XATL final validation loss (nats/token)", num(parent.get("xatl_final_val_loss"))))
        match = parent.get("steps_to_match_scratch_final_loss")
        ratio = parent["steps_to_match_ratio"]
        rows.append(("XATL steps to reach scratch's final loss", "not reached" if match is None else
                     f"{num(match)} of {num(parent.get('total_steps'))} (ratio {num(ratio)})"))
    for key, label in (("steps", "optimizer steps"), ("tokens_seen", "training tokens")):
        if key in metrics:
            rows.append((label, num(metrics[key])))
    if "train_time_s" in metrics:
        rows.append(("training time (s)", f"{metrics['train_time_s']:.0f}"))
    return rows


VERIFY_ROWS = (
    ("has normalization (per-token scale)", lambda r: r["has_normalization"]),
    ("HF vs TransformerLens max abs logit diff", lambda r: r["hf_tl_max_abs_logit_diff"]),
    ("DLA relative error (exact DLA: ~0)", lambda r: r["dla_relative_error"]),
    ("frozen-scale DLA error", lambda r: r["dla_frozen_scale_error"]),
    ("spread of the LN divisor over tokens", lambda r: r["hf_scale_spread"]),
    ("attribution vs activation patching correlation", lambda r: r["patching"]["correlation"]),
    ("validation loss (nats/token)", lambda r: r["validation"]["loss"]),
)


def verify_table(report: dict) -> list[str]:
    """Markdown lines of the side-by-side table of a `surgery verify` report.json."""
    results = report.get("results") or {}
    if not results:
        return []
    lines = ["| check | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for label, get in VERIFY_ROWS:
        cells = []
        for r in results.values():
            try:
                cells.append(num(get(r)))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    failures = report.get("failures") or []
    lines += ["", "LN-free checks: " + ("FAILED: " + "; ".join(failures) if failures else "passed") + "."]
    return lines


def snippets(repo_id: str, model_type: str, auto_class: str, needs_surgery: bool) -> list[str]:
    load = [f"from transformers import {auto_class}, AutoTokenizer", ""]
    if needs_surgery:
        load = ["import surgery.xatl  # pip install lm-surgery; registers this architecture with transformers", *load]
    lines = ["## How to load", "", "With `transformers`:", "", "```python", *load,
             f'model = {auto_class}.from_pretrained("{repo_id}")', f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```"]
    if lens_supports(model_type):
        lines += ["", "In TransformerLens (`pip install lm-surgery`; an LN-free model loads with no normalization, so "
                  "direct logit attribution is exact):", "", "```python", "from huggingface_hub import snapshot_download",
                  "from surgery.lens import load_hooked", "", f'model = load_hooked(snapshot_download("{repo_id}"))', "```"]
    return lines


SHAPE_KEYS = ("n_layer", "num_hidden_layers", "n_embd", "hidden_size", "n_head", "num_attention_heads",
              "num_key_value_heads", "n_positions", "max_position_embeddings", "vocab_size")


def render(source: PublishSource, repo_id: str, meta: dict, checks: dict, files: list[str], auto_class: str,
           needs_surgery: bool) -> str:
    """The card text. `checks`: the reload check's result (surgery.publish.check); `files`: the published files."""
    config = source.model_config
    ln_free = "ln-free" in meta["tags"]
    kind = "An LN-free" if ln_free else "A"
    shape = ", ".join(f"{k} {config[k]}" for k in SHAPE_KEYS if k in config)
    intro = (f"{kind} `{config.get('model_type', '?')}` model ({shape}) made with [lm-surgery](https://pypi.org/project/lm-surgery/)"
             + (f" from `{meta['base_model']}`" if "base_model" in meta else "") + ".")
    data_args = (source.recipe.get("data") or {}).get("init_args") or {}
    data = data_args.get("data") or (f"stdlib:{data_args['part']}" if data_args.get("part") else None)
    if data:
        intro += f" Training data: `{data}`" + (" (Python standard library source files)" if data.startswith("stdlib") else "") + "."
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "", f"# {repo_id.split('/')[-1]}", "", intro]
    if ln_free:
        lines += ["", "Every norm is gone: each block norm is neutralised (weight 1e6, eps 1e12: it only centers a LayerNorm's "
                  "input, and passes an RMSNorm's through), its affine and fixed 1/sigma folded into the projections that "
                  "read it; the final norm applies a fixed per-channel scale. The config records `surgery_ln_free`. "
                  "It is a vanilla checkpoint: plain `transformers` runs it unchanged."]
    rows = result_rows(source.metrics, source.parent_metrics)
    if rows:
        lines += ["", "## Results", "", "Measured by the run that produced this model (`metrics.json`).", "",
                  "| measurement | value |", "|---|---:|", *[f"| {a} | {b} |" for a, b in rows]]
        plots = sorted(f for f in files if f.startswith("plots/"))
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in plots] if plots else []
    if source.verify_dir is not None:
        report = json.loads((source.verify_dir / "report.json").read_text())
        lines += ["", "## Verification in TransformerLens", "", f"`surgery verify` on {report.get('blocks', report.get('validation_blocks', '?'))} "
                  f"blocks of {report.get('block_size', '?')} tokens ({scored_text(report)}; `verify/report.json`).", "", *verify_table(report)]
    lines += ["", "## Reload check", "", f"Before publishing, this folder was loaded {checks['loader']} and its logits "
              f"compared with the run's model on {checks['blocks']} blocks of {checks['block_size']} tokens: max abs "
              f"difference {num(checks['max_abs_logit_diff'])}."]
    if "lens_max_abs_logit_diff" in checks:
        lines[-1] += f" Loaded with `surgery.lens.load_hooked`: max abs difference {num(checks['lens_max_abs_logit_diff'])}."
    lines += ["", *snippets(repo_id, config.get("model_type", ""), auto_class, needs_surgery)]
    if source.recipe_path is not None:
        lines += ["", "## Reproduce", "", "`recipe.yaml` is the full Lightning CLI configuration of the run "
                  "(local paths in it refer to the machine it ran on):", "", "```bash", "pip install lm-surgery",
                  "surgery fit --config recipe.yaml", "```"]
        for change in source.metrics.get("resumed_with_changes") or []:  # --checkpoint.accept_changes
            what = "; ".join(f"`{k}` {json.dumps(v[0])} -> {json.dumps(v[1])}" for k, v in change.get("changes", {}).items())
            lines += ["", f"The run was resumed at step {change.get('step')} with changed settings ({what}; "
                      f"{change.get('note', '')}): `recipe.yaml` holds the settings after the change, so it does not "
                      "reproduce this run exactly (`metrics.json`: `resumed_with_changes`)."]
    lines += ["", "## Files", "", *[f"- `{f}`" for f in sorted(files) if f != "README.md"]]
    return "\n".join(lines) + "\n"


def scored_text(report: dict) -> str:
    """Which text a verify report scored: a split of its data, or all of it (reports before `split`: validation)."""
    split = report.get("split", "validation")
    return f"all of {report.get('data', 'its data')}" if split == "all" else f"the {split} split of {report.get('data', 'its data')}"
