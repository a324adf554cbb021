"""Generation cost per token against context length: GPT-2 attention vs the linear-cost mixers (XATL hybrids).

    OMP_NUM_THREADS=1 python -m benchmarks.xatl_generation [--out runs/xatl/generation] [--contexts 256 512 1024 2048 4096]

Same width, depth, heads and vocabulary for every model; the KV cache (attention) or the recurrent state
(mixers) is filled with an L-token prompt, then tokens are decoded one at a time: the fastest step is the
per-token latency, also given as a ratio to attention at the same L (measured in the same run). The method
lives in benchmarks/generation.py (`run_benchmark` returns the rows, for other code).

Writes <out>/results.json, <out>/results.md and <out>/generation.png, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
import transformers

from benchmarks.generation import CONTEXTS, MIXERS, plot, run_benchmark, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/xatl/generation")
    parser.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    parser.add_argument("--mixers", nargs="+", default=list(MIXERS))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="sweeps; each cell keeps its fastest")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared machines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(width=args.width, depth=args.depth, heads=args.heads)
    rows = run_benchmark(args.contexts, args.mixers, args.new_tokens, args.batch, args.repeats, verbose=True,
                         **shape)
    meta = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread(s)".strip(),
            "torch": torch.__version__, "transformers": transformers.__version__, "date": date.today().isoformat(), "batch": args.batch,
            "new_tokens": args.new_tokens, "repeats": args.repeats, **shape}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = table(rows)
    (out / "results.md").write_text(f"{json.dumps(meta)}\n\n{md}\n")
    plot(rows, out / "generation.png",
         f"d={args.width}, {args.depth} layers, batch {args.batch}: decoding cost per token")
    print(md)
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'generation.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
