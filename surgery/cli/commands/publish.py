"""`surgery publish RUN_OR_MODEL_DIR --repo-id OWNER/NAME [--private] [--revision R] [--dry-run OUT_DIR]`.

Assembles the folder to upload (safetensors weights, config, tokenizer, generation config, recipe.yaml,
metrics.json, the verification report, a README.md model card built from the measurements), reloads it with
plain `transformers` (and TransformerLens for GPT-2) and compares logits with the run's model, then uploads it
with huggingface_hub (token: HF_TOKEN or the one saved by `hf auth login`). `--dry-run` only writes the folder.
"""

from __future__ import annotations

import json
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("path", help="a finished run directory (model/ and metrics.json) or a model directory")
    parser.add_argument("--repo-id", required=True, help="Hub repository OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    parser.add_argument("--dry-run", type=Path, default=None, metavar="OUT_DIR",
                        help="write the folder that would be uploaded to OUT_DIR (new or empty) and upload nothing")
    parser.add_argument("--license", default="mit", help="Hub license id for the card (default mit, GPT-2's license)")
    parser.add_argument("--verify", type=Path, default=None, metavar="DIR",
                        help="a `surgery verify --out` directory to include (default: <run>/verify when present)")
    parser.add_argument("--base-model", default=None, help="Hub id of the base model (default: from the recipe, if a Hub name)")
    parser.add_argument("--dataset", action="append", default=None, help="Hub dataset id for the card (repeatable; default: from the recipe)")


def run(args) -> int:
    from surgery.publish import publish

    result = publish(args.path, args.repo_id, private=args.private, revision=args.revision, dry_run=args.dry_run,
                     license=args.license, verify=args.verify, base_model=args.base_model, datasets=args.dataset)
    checks = result["checks"]
    line = f"reload check: max |logit diff| {checks['max_abs_logit_diff']:.3g} ({checks['loader']})"
    if "lens_max_abs_logit_diff" in checks:
        line += f"; TransformerLens {checks['lens_max_abs_logit_diff']:.3g}"
    print(line)
    print("files: " + ", ".join(result["files"]))
    if result["uploaded"]:
        print(f"published {args.repo_id}: {result['commit_url']}")
    else:
        print(f"dry run: wrote {result['folder']} (nothing uploaded); metadata {json.dumps(result['metadata'])}")
    return 0
