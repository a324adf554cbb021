"""`surgery export CHECKPOINT --out DIR`: a run's Lightning checkpoint as a plain Hugging Face model.

A removal checkpoint whose LayerNorms are all fake is folded into an LN-free model of its own class; one taken
mid-removal (some norms still real) is refused, naming them; any other surgery checkpoint is saved as the model
it holds. The tokenizer is copied from `--tokenizer`, or from the run's starting model when the checkpoint
names one.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="a surgery run's .ckpt (e.g. runs/NAME/checkpoints/last.ckpt)")
    parser.add_argument("--out", type=Path, required=True, help="directory to write (save_pretrained format)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save beside the model (default: the one the run recorded: <run>/model, its data.tokenizer or its init model)")


def run(args) -> int:
    from surgery.errors import SurgeryError
    from surgery.models.loading import checkpoint_tokenizer, load_lightning_checkpoint, load_tokenizer
    from surgery.remove_ln.export import export_ln_free

    if not Path(args.checkpoint).is_file():
        raise SurgeryError(f"checkpoint {args.checkpoint!r} does not exist; runs keep theirs in <run>/checkpoints/last.ckpt")
    if args.out.exists() and not args.out.is_dir():
        raise SurgeryError(f"--out {str(args.out)!r} is a file, not a directory: pass a new directory to write the model into")
    if (args.out / "config.json").exists():
        raise SurgeryError(f"{str(args.out)!r} already holds a model; choose another --out or delete it")
    blocked = next((p for p in args.out.parents if p.exists()), None)
    if blocked is not None and not blocked.is_dir():
        raise SurgeryError(f"--out {str(args.out)!r} cannot be created: {str(blocked)!r} is a file")
    model = load_lightning_checkpoint(args.checkpoint)
    prepared = any(".ln_qk." in k for k in model.state_dict())
    exported = export_ln_free(model) if prepared else model
    tok = load_tokenizer(args.tokenizer or checkpoint_tokenizer(args.checkpoint))
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SurgeryError(f"--out {str(args.out)!r} cannot be created ({err.strerror}): choose a directory you can write to") from None
    exported.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    kind = f"LN-free {type(exported).__name__}" if prepared else type(exported).__name__
    print(f"exported {kind} ({sum(p.numel() for p in exported.parameters()):,} parameters) to {args.out}")
    return 0
