"""`surgery verify MODEL_DIR [--baseline ORIGINAL_DIR] --out DIR`: residual-stream checks in TransformerLens.

Loads each model (GPT-2, GPT-NeoX, Llama-style, Qwen3, Gemma 3 or OLMo 2) into TransformerLens (`surgery.lens.load_hooked`, offline), runs every check of
`surgery.lens.report.verify_model` on text blocks of `--data` (`--split`, as `surgery eval`: all of a local file or
directory, the validation split of stdlib), prints a side-by-side table and writes `report.json`,
`report.md`, `dla_error_per_layer.png` and `patching_scatter.png` into `--out`.
Beside the checks it reports, for each model and its baseline, the analyses of the LN-removal papers
(`surgery.lens.analyses`): output entropy and expected calibration error on the validation blocks
(`calibration.png`, a reliability diagram), the residual norm at position 0 against the other positions per
layer (`first_position_norm.png`), the share of heads that are attention sinks, and the final layer's entropy
neurons (large output weight in the unembedding's null space) with what mean-ablating them does to the loss and
the entropy (`entropy_neurons.png`). It also measures, per layer, what a LayerNorm gives attention (Brody, Alon &
Yahav 2023; `surgery.lens.expressivity`): the share of unselectable keys (inside the convex hull of the other keys
of their sequence, decided by a linear program; `unselectable_keys.png`), the all-ones component of the attention
input before and after the norm point (`all_ones_component.png`) and the attention entropy relative to uniform
attention (`attention_entropy.png`). report.md states every definition and selection rule.
A model is LN-free when every norm is neutralised, measured on held-out text (`surgery.models.ln_free`; our
export, Baroni et al.'s and Heimersheim's published formats alike, no config key needed); a partly converted
model is refused (exit 2) with the names of the norms that still normalize, and so is a numeric argument out of
its range (one line naming it and the valid range). A model with norms is reported as such ("with LN"), ungated.
Exit status 1 when MODEL_DIR is LN-free and fails its checks (`surgery.lens.checks.LN_FREE_THRESHOLDS`).
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.cli.commands.eval import SPLITS, scored_blocks, split_words
from surgery.errors import SurgeryError


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model directory written by save_pretrained (GPT-2, GPT-NeoX, Llama-style, Qwen3, Gemma 3 or OLMo 2; LN-free or not)")
    parser.add_argument("--baseline", default=None, help="the original model directory, checked side by side")
    parser.add_argument("--out", type=Path, required=True, help="directory for report.json, report.md and plots")
    parser.add_argument("--data", default="stdlib", help="text to check on: 'stdlib' or a local .txt/.jsonl/.parquet/.csv "
                        "file or a directory of them")
    parser.add_argument("--split", choices=SPLITS, default=None, help="the text used: 'all' of it (the default for a local "
                        "file or directory), its 'validation' split (the default for stdlib) or its 'train' split")
    parser.add_argument("--text-field", default="text", help="the field (.jsonl) or column (.parquet, .csv) that holds the text")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL_DIR's own)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per held-out block (capped at the context)")
    parser.add_argument("--val-blocks", type=int, default=32, help="blocks of the split for cross-entropy (the first N)")
    parser.add_argument("--dla-blocks", type=int, default=4, help="blocks for logits, DLA and attention-sink checks")
    parser.add_argument("--seg-len", type=int, default=32, help="segment length of the induction prompts")
    parser.add_argument("--prompts", type=int, default=16, help="number of induction prompts")
    parser.add_argument("--seed", type=int, default=0)


# Each numeric argument's smallest valid value (the largest, where one exists, depends on the model's context).
MINIMA = {"block_size": 2, "val_blocks": 1, "dla_blocks": 1, "seg_len": 1, "prompts": 1, "seed": 0}


def check_numbers(args) -> None:
    """SurgeryError naming the first numeric argument out of its range."""
    for key, low in MINIMA.items():
        value = getattr(args, key)
        if value < low:
            valid = f"from {low} to half the model's context" if key == "seg_len" else f">= {low}"
            raise SurgeryError(f"--{key.replace('_', '-')} {value} is out of range: it must be an integer {valid}")


def check_same_vocabulary(model, tokenizer, baseline, base_tokenizer, model_dir: str, baseline_dir: str) -> None:
    a, b = model.config.vocab_size, baseline.config.vocab_size
    same_tok = tokenizer is None or base_tokenizer is None or tokenizer.get_vocab() == base_tokenizer.get_vocab()
    if a != b or not same_tok:
        what = f"vocabulary sizes {a} and {b}" if a != b else "different tokenizers"
        raise SurgeryError(
            f"{model_dir!r} and baseline {baseline_dir!r} have {what}: the baseline must be the model the LN-free "
            "export was made from (same tokenizer)"
        )


def run(args) -> int:
    import torch

    from surgery.data import TokenBlocks
    from surgery.families import context_length_of
    from surgery.lens import load_hf, load_hooked, transformer_lens_version
    from surgery.lens.checks import LN_FREE_THRESHOLDS, ln_free_failures
    from surgery.lens.report import VerifySettings, plot, print_table, verify_model, write_markdown
    from surgery.models.ln_free import check_consistent, scan_norms

    check_numbers(args)
    torch.manual_seed(args.seed)
    models = {"model": (args.model, *load_hf(args.model))}
    if args.baseline is not None:
        models["baseline"] = (args.baseline, *load_hf(args.baseline))
        check_same_vocabulary(models["model"][1], models["model"][2], models["baseline"][1], models["baseline"][2], args.model, args.baseline)
    n_ctx = min(context_length_of(m.config) for _, m, _ in models.values())
    block_size = min(args.block_size, n_ctx)
    if 2 * args.seg_len > n_ctx:
        raise SurgeryError(f"--seg-len {args.seg_len} makes {2 * args.seg_len}-token prompts, longer than the context "
                           f"({n_ctx}): it must be an integer from 1 to {n_ctx // 2}")
    tokenizer_dir = args.tokenizer or args.model
    if not (Path(tokenizer_dir) / "tokenizer.json").exists():
        raise SurgeryError(f"no tokenizer.json in {tokenizer_dir!r}: save the tokenizer there, or pass --tokenizer DIR")
    data = TokenBlocks(args.data, tokenizer=tokenizer_dir, block_size=block_size, max_val_blocks=args.val_blocks,
                       text_field=args.text_field)
    blocks, split = scored_blocks(data, args)
    held_out = f"{args.data}, {split_words(data.corpus, split)}: {len(blocks)} blocks of {block_size} tokens"
    vocab = min(m.config.vocab_size for _, m, _ in models.values())
    if int(blocks.tokens.max()) >= vocab:
        raise SurgeryError(f"the tokenizer of {args.model!r} produces ids up to {int(blocks.tokens.max())}, beyond the model's vocabulary ({vocab})")
    if len(blocks) * blocks.block_size < 2 * args.seg_len + 1:
        more = " or pass --split all" if split != "all" else ""
        raise SurgeryError(f"--seg-len {args.seg_len} needs {2 * args.seg_len + 1} tokens for its prompts, but the "
                           f"{len(blocks)} blocks used ({held_out}) hold {len(blocks) * blocks.block_size}: lower "
                           f"--seg-len or raise --val-blocks{more}")
    settings = VerifySettings(dla_blocks=args.dla_blocks, seg_len=args.seg_len, n_prompts=args.prompts, seed=args.seed)

    scan_tokens = torch.stack([blocks[i] for i in range(min(2, len(blocks)))]) if len(blocks) else None  # held-out text
    scans = {}
    for key, (_, hf_model, _) in models.items():
        scans[key] = scan_norms(hf_model, scan_tokens)
        check_consistent(hf_model, scans[key], allow_removal_in_progress=False)
    ln_free = scans["model"].ln_free

    results, names, detection = {}, {}, {}
    for key, (path, hf_model, tokenizer) in models.items():
        label = f"{key} ({'LN-free' if scans[key].ln_free else 'with LN'})"
        hooked = load_hooked(hf_model, tokenizer=tokenizer, ln_free=scans[key].ln_free)
        results[label] = verify_model(hf_model, hooked, blocks, settings)
        names[label], detection[label] = path, scans[key].summary()
    title = f"surgery verify: {args.model}" + (f" vs {args.baseline}" if args.baseline else "")
    print_table(results, f"{title}\non {held_out}")

    model_label = next(iter(results))
    failures = ln_free_failures(results[model_label]) if ln_free else []
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "models": names,
        "data": args.data,
        "split": split,
        "split_tokens": len(blocks.tokens),
        "blocks": len(blocks),
        "block_size": block_size,
        "validation_blocks": len(blocks),  # = blocks: the name before --split, which model cards read
        "settings": vars(settings),
        "transformer_lens": transformer_lens_version(),
        "ln_free_thresholds": LN_FREE_THRESHOLDS,
        "ln_free_detection": detection,
        "failures": failures,
        "results": results,
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "report.md", results, title, settings, block_size, data=held_out)
    plot(args.out, results)
    print(f"wrote {args.out / 'report.json'}, report.md and plots")
    if failures:
        print("LN-free checks FAILED: " + "; ".join(failures))
        return 1
    if ln_free:
        print("LN-free checks passed: " + ", ".join(f"{k} < {v:g}" for k, v in LN_FREE_THRESHOLDS.items()) + ", no normalization")
    return 0
