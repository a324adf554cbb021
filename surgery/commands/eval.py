"""`surgery eval MODEL_DIR --data SOURCE`: held-out cross-entropy (nats/token) and perplexity.

The result says what the model's norms do (`norms`: "LN-free", "with LN", or, for a Lightning checkpoint of a
LayerNorm removal in progress, "partly LN-free"), measured by `surgery.ln_free.scan_norms`; a published model
that is only partly converted is refused with the names of the norms that still normalize.
"""

from __future__ import annotations

import json
from pathlib import Path

from surgery.errors import SurgeryError


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model directory (save_pretrained), .ckpt, or Hub name")
    parser.add_argument("--data", default="stdlib", help="'stdlib', a local .txt/.jsonl/.parquet path, or a Hub dataset")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (default: the model's own; for a .ckpt, the one its run "
                        "recorded: <run>/model, else the run's data.tokenizer or starting model)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per evaluated block")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N validation blocks")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this JSON file")


def check_arguments(args) -> None:
    if args.block_size < 2:
        raise SurgeryError(f"--block-size {args.block_size}: a block needs at least 2 tokens (each token is predicted from "
                           "the ones before it); pass 2 or more, e.g. 256")
    if args.batch_size < 1:
        raise SurgeryError(f"--batch-size {args.batch_size}: pass a positive number of blocks per batch")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise SurgeryError(f"--max-blocks {args.max_blocks}: evaluate at least one block, or omit --max-blocks for the "
                           "whole validation split")


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from surgery.data import TokenBlocks
    from surgery.evaluate import cross_entropy
    from surgery.ln_free import check_consistent, scan_norms
    from surgery.loading import load_causal_lm

    check_arguments(args)
    model = load_causal_lm(args.model)
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.block_size > positions:
        raise SurgeryError(f"--block-size {args.block_size}: the model has only {positions} positions; pass --block-size "
                           f"{positions} or less")
    scan = scan_norms(model)
    check_consistent(model, scan)  # a removal checkpoint may be part-way; an exported model may not
    data = TokenBlocks(args.data, args.tokenizer or args.model, args.block_size, args.batch_size, max_val_blocks=args.max_blocks)
    result = {"model": args.model, "data": args.data, "block_size": args.block_size, "norms": scan.kind()}
    result.update(cross_entropy(model, data.split("validation"), args.batch_size, progress=True))
    table = Table(title=f"{args.model} ({scan.kind()}) on {args.data} (validation split)")
    for col in ("cross-entropy (nats/token)", "perplexity", "tokens"):
        table.add_column(col, justify="right")
    table.add_row(f"{result['loss']:.4f}", f"{result['perplexity']:.3f}", str(result["tokens"]))
    Console().print(table)
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
