"""`surgery eval MODEL --data SOURCE`: cross-entropy (nats/token) and perplexity; `--tasks a,b`: standard
benchmarks through lm-evaluation-harness (`surgery.eval.harness`), alone or beside the cross-entropy (with `--data`).

`--split` says which text is scored: "all" of a local file or directory (its default there: a file the user names is
scored whole), the "validation" split (the default for stdlib and Hub datasets: the text training holds out with
the default data.val_fraction, 0.02) or the "train" split. The table and the JSON say what was scored: the split,
the tokens in it, and the blocks of `--block-size` tokens cut from them.

The result says what the model's norms do (`norms`: "LN-free", "with LN", or, for a Lightning checkpoint of a
LayerNorm removal in progress, "partly LN-free"), measured by `surgery.models.ln_free.scan_norms`; a published model
that is only partly converted is refused with the names of the norms that still normalize.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError

SPLITS = ("all", "validation", "train")


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model directory (save_pretrained), .ckpt, or Hub name")
    parser.add_argument("--data", default=None, help="cross-entropy on 'stdlib' (the default without --tasks), a local "
                        ".txt/.jsonl/.parquet/.csv file or a directory of them, or a Hub dataset")
    parser.add_argument("--split", choices=SPLITS, default=None, help="the text scored: 'all' of it (the default for a "
                        "local file or directory), its 'validation' split (the default for stdlib and Hub datasets: what "
                        "training holds out with data.val_fraction 0.02) or its 'train' split")
    parser.add_argument("--text-field", default="text", help="the field (.jsonl, Hub) or column (.parquet, .csv) that "
                        "holds the text")
    parser.add_argument("--tasks", default=None, help="comma-separated lm-eval tasks (hellaswag,piqa,..., from the Hub; "
                        "stdlib_next_line offline; or tasks of --include-path), run through lm-evaluation-harness")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of lm-eval task YAMLs (repeatable)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: evaluate only the first N docs of each task")
    parser.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: examples in each prompt (default: "
                        "each task's own)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own; for a .ckpt, the one its run "
                        "recorded: <run>/model, else the run's data.tokenizer or starting model)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per evaluated block")
    parser.add_argument("--batch-size", type=int, default=16, help="blocks (or lm-eval requests) per forward pass")
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks of the split")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")


def check_arguments(args) -> None:
    if args.block_size < 2:
        raise SurgeryError(f"--block-size {args.block_size}: a block needs at least 2 tokens (each token is predicted from "
                           "the ones before it); pass 2 or more, e.g. 256")
    if args.batch_size < 1:
        raise SurgeryError(f"--batch-size {args.batch_size}: pass a positive number of blocks per batch")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise SurgeryError(f"--max-blocks {args.max_blocks}: evaluate at least one block, or omit --max-blocks to score "
                           "every block of the split")
    if args.tasks is not None and not [t for t in args.tasks.split(",") if t.strip()]:
        raise SurgeryError(f"--tasks {args.tasks!r}: name at least one task, e.g. --tasks stdlib_next_line")
    if args.include_path and args.tasks is None:
        raise SurgeryError("--include-path names folders of lm-eval tasks: pass --tasks with the tasks to run from them")
    if args.limit is not None and args.limit < 1:
        raise SurgeryError(f"--limit {args.limit}: evaluate at least one doc per task, or omit --limit for all of them")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise SurgeryError(f"--num-fewshot {args.num_fewshot}: pass 0 or more examples per prompt")
    from surgery.eval.harness import check_include_paths

    check_include_paths(args.include_path)


def run(args) -> int:
    from surgery.models.ln_free import check_consistent, scan_norms
    from surgery.models.loading import load_causal_lm

    check_arguments(args)
    if args.data is None and args.tasks is None:
        args.data = "stdlib"
    model = load_causal_lm(args.model)
    scan = scan_norms(model)
    check_consistent(model, scan)  # a removal checkpoint may be part-way; an exported model may not
    result = {"model": args.model, "norms": scan.kind()}
    if args.data is not None:
        result.update(held_out_loss(model, args, scan.kind()))
    if args.tasks is not None:
        result["lm_eval"] = benchmarks(model, args, scan.kind())
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def fix_too_few_tokens(err) -> SurgeryError:
    """`surgery.data.TooFewTokens` retold with the flags of `surgery eval` and `surgery verify` (not data.*)."""
    fixes = []
    if err.split != "all":
        fixes.append("--split all to score the whole input")
    if err.tokens >= 2:
        fixes.append(f"--block-size {err.tokens} or less")
    cause = f" ({err.cause})" if err.cause else ""
    fix = "pass " + " or ".join(fixes) if fixes else "add text to the data"
    return SurgeryError(f"{err.what}{cause}: {fix}")


def scored_blocks(data, args):
    """(blocks of the split that `args.split` or the data's default names, the split's name); the data layer's errors
    that name training's settings retold with this command's flags."""
    from surgery.data import TooFewTokens
    from surgery.data.formats import MissingTextField

    split = args.split or data.corpus.default_eval_split
    try:
        return data.split(split), split
    except TooFewTokens as err:
        raise fix_too_few_tokens(err) from None
    except MissingTextField as err:
        raise err.for_flag("--text-field") from None


def split_words(corpus, split: str) -> str:
    """"all of it (3 files)", "validation split (its last 2% of text, ...)": for a table title and report.md."""
    from surgery.data.corpus import describe_split

    return f"{'all of it' if split == 'all' else split + ' split'} ({describe_split(corpus, split)})"


def held_out_loss(model, args, kind: str) -> dict:
    """Cross-entropy on --split of --data, printed as a table; {"data", "split", "split_tokens", "blocks", "block_size",
    "loss", "perplexity", "tokens" (predicted: block_size - 1 a block)} (and "val_fraction" for a split)."""
    from rich.console import Console
    from rich.table import Table

    from surgery.data import TokenBlocks
    from surgery.eval.loss import cross_entropy
    from surgery.families import context_length_of

    positions = context_length_of(model.config)
    if positions is not None and args.block_size > positions:
        raise SurgeryError(f"--block-size {args.block_size}: the model has only {positions} positions; pass --block-size "
                           f"{positions} or less")
    data = TokenBlocks(args.data, args.tokenizer or args.model, args.block_size, args.batch_size, max_val_blocks=args.max_blocks,
                       text_field=args.text_field)
    blocks, split = scored_blocks(data, args)
    result = {"data": args.data, "split": split, "split_tokens": len(blocks.tokens), "blocks": len(blocks),
              "block_size": args.block_size}
    if split != "all":
        result["val_fraction"] = data.corpus.val_fraction
    result.update(cross_entropy(model, blocks, args.batch_size, progress=True))
    left = len(blocks.tokens) - len(blocks) * args.block_size
    where = "data" if split == "all" else f"{split} split"
    why = "past --max-blocks or short of a block" if args.max_blocks is not None else "short of a block"
    console = Console()
    # the title above the table, not in it: a long path would otherwise wrap to the table's width
    console.print(f"{args.model} ({kind}) on {args.data}: {split_words(data.corpus, split)}", markup=False, highlight=False)
    table = Table(caption=f"scored {len(blocks)} blocks of {args.block_size} of the {len(blocks.tokens)} tokens in the "
                          f"{where} ({left} left over, {why}); each block's first token is context only")
    for col in ("cross-entropy\n(nats/token)", "perplexity", "split", "blocks", "block\nsize", "tokens\npredicted"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['loss']:.4f}", f"{result['perplexity']:.3f}", split, str(len(blocks)), str(args.block_size),
                  str(result["tokens"]))
    console.print(table)
    return result


def benchmarks(model, args, kind: str) -> dict:
    """lm-eval's tasks of --tasks (`surgery.eval.harness.run_tasks`), printed as a table of task, metric, value ± stderr."""
    from rich.console import Console
    from rich.table import Table

    from surgery.data.tokenizer import get_tokenizer
    from surgery.eval.harness import run_tasks

    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = run_tasks(model, get_tokenizer(args.tokenizer or args.model), names, args.include_path, args.batch_size,
                       args.limit, args.num_fewshot)
    table = Table(title=f"{args.model} ({kind}): lm-eval {result['version']}")
    for col, justify in (("task", "left"), ("metric", "left"), ("value", "right"), ("± stderr", "right"), ("docs", "right")):
        table.add_column(col, justify=justify)
    for task, rows in result["tasks"].items():
        for metric, v in rows.items():
            value = f"{v['value']:.4f}" if isinstance(v["value"], (int, float)) else str(v["value"])
            stderr = f"{v['stderr']:.4f}" if v["stderr"] is not None else ""
            table.add_row(task, metric, value, stderr, str(result["n_samples"].get(task, "")))
    Console().print(table)
    return result
