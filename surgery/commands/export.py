"""`surgery export CHECKPOINT --out DIR`: a run's Lightning checkpoint as a plain Hugging Face model.

A removal checkpoint whose LayerNorms are all fake is folded into an LN-free GPT-2; any other
surgery checkpoint is saved as the model it holds. The tokenizer is copied from `--tokenizer`, or
from the run's starting model when the checkpoint names one.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a surgery run's .ckpt (e.g. runs/NAME/checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (save_pretrained format)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save beside the model (default: the run's init model)")


def run(args) -> int:
    from surgery.errors import SurgeryError
    from surgery.loading import read_checkpoint, load_lightning_checkpoint, load_tokenizer
    from surgery.remove_ln.export import export_ln_free

    if not Path(args.checkpoint).is_file():
        raise SurgeryError(f"checkpoint {args.checkpoint!r} does not exist; runs keep theirs in <run>/checkpoints/last.ckpt")
    if (args.out / "config.json").exists():
        raise SurgeryError(f"{str(args.out)!r} already holds a model; choose another --out or delete it")
    model = load_lightning_checkpoint(args.checkpoint)
    prepared = any(".ln_qk." in k for k in model.state_dict())
    exported = export_ln_free(model) if prepared else model
    tokenizer = args.tokenizer or read_checkpoint(args.checkpoint).get("hyper_parameters", {}).get("init")
    if tokenizer is None:
        raise SurgeryError("the checkpoint names no starting model to take the tokenizer from: pass --tokenizer DIR_OR_NAME")
    tok = load_tokenizer(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    exported.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    kind = "LN-free GPT-2" if prepared else type(exported).__name__
    print(f"exported {kind} ({sum(p.numel() for p in exported.parameters()):,} parameters) to {args.out}")
    return 0
