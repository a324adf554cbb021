"""`python -m benchmarks`: what surgery costs against plain training, measured in one process (CPU; ~10 min).

Sections: (1) norm-removal training step vs plain fine-tuning at each schedule phase, for the shipped tiny
checkpoints of each family and a random GPT-2-small shape; (2) export to an LN-free GPT-2 and TransformerLens load time;
(3) mixers: training tokens/s and memory vs sequence length, the Hugging Face Mamba peer, generation
latency; (4) GPU: skipped without CUDA. Writes <out>/bench.json, <out>/bench.md, <out>/mixers.png.
Runs from a source checkout: `benchmarks` is not part of the installed package.
"""

from __future__ import annotations

import os
from pathlib import Path

from surgery.errors import SurgeryError

SECTIONS = ("removal", "export", "mixers", "gpu")


def add_arguments(parser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for bench.json/.md/.png")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--removal-models", nargs="+",
                        default=["tiny-gpt2-stdlib", "tiny-pythia-stdlib", "tiny-llama-stdlib", "gpt2-small"],
                        help="a shipped checkpoint (tiny-gpt2-stdlib, tiny-pythia-stdlib, tiny-llama-stdlib), a random "
                             "model of a real shape (gpt2-small, pythia-160m, smollm2-135m) or a model directory")
    parser.add_argument("--batch", type=int, default=8, help="removal benchmark: sequences per step (8 x 256: a quick start's step)")
    parser.add_argument("--seq", type=int, default=256, help="removal benchmark: tokens per sequence")
    parser.add_argument("--repeats", type=int, default=12, help="interleaved rounds for small models")
    parser.add_argument("--large-repeats", type=int, default=3, help="interleaved rounds for models > 50M params")
    parser.add_argument("--mixer-seqs", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--mixer-models", nargs="+", default=None,
                        help="mixers section: only these models (default: all of benchmarks.mixer_cost.MODELS)")
    parser.add_argument("--mixer-width", type=int, default=128)
    parser.add_argument("--mixer-depth", type=int, default=2)
    parser.add_argument("--mixer-repeats", type=int, default=2, help="rounds up to 1024 tokens (1 above)")
    parser.add_argument("--hf-max-seq", type=int, default=1024,
                        help="longest sequence hf-mamba trains on (its sequential CPU scan: ~16 s a step at 1024)")
    parser.add_argument("--new-tokens", type=int, default=32, help="generation: decoded tokens per context")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on shared machines)")
    parser.add_argument("--no-profile", action="store_true", help="skip torch.profiler for phases above 1.05x")


def _gpu_section(seq: int = 1024) -> dict:
    """Removal vs plain bf16 training of a GPT-2-small shape at the largest batch that fits, with MFU,
    and the mixers' CUDA kernels vs their PyTorch paths."""
    import torch
    from transformers import GPT2Config

    from benchmarks import gpu_cost
    from benchmarks.report import progress_line

    dev, dtype = torch.device("cuda"), torch.bfloat16
    peak = gpu_cost.matmul_peak_flops(dev, dtype)
    cfg = GPT2Config()
    batch = gpu_cost.largest_batch(cfg, seq, dev, dtype)
    removal = gpu_cost.removal_rows(cfg, seq, batch, dev, dtype, peak_flops=peak)
    for r in removal:
        print(progress_line(r), flush=True)
    return {"device": torch.cuda.get_device_name(dev), "peak_flops": peak, "removal": removal,
            "kernels": gpu_cost.kernel_rows(device=dev, dtype=dtype)}


def run(args) -> int:
    if args.batch < 1 or args.seq < 2 or min(args.mixer_seqs) < 2:
        raise SurgeryError("--batch must be >= 1 and --seq / --mixer-seqs >= 2 tokens")
    import torch

    from benchmarks import export_cost, gpu_cost, mixer_cost, removal_cost, report
    from benchmarks.measure import machine_info

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    record: dict = {"machine_start": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    md: list[str] = []
    removal_model = None
    if "removal" in args.sections or "export" in args.sections:
        record["removal"] = []
        md.append("## LN-removal step vs plain fine-tuning (interleaved in one process)")
        for name in args.removal_models:
            model = removal_cost.build_model(name)
            big = sum(p.numel() for p in model.parameters()) > 50e6
            res = removal_cost.run(name, args.batch, args.seq, args.large_repeats if big else args.repeats,
                                   profile=not args.no_profile, model=model, verbose=True)
            removal_model = res.pop("removal_model")
            del model
            record["removal"].append(res)
            md += ["", report.removal_table(res)]
            print(md[-1], flush=True)
    if "export" in args.sections and removal_model is not None:
        res = export_cost.run(removal_model)
        record["export"] = {"model": args.removal_models[-1], **res}
        md += ["", f"## Export and TransformerLens load ({args.removal_models[-1]})", "", report.export_table(res)]
        print(md[-1], flush=True)
    removal_model = None
    if "mixers" in args.sections:
        names = args.mixer_models or mixer_cost.MODELS
        unknown = sorted(set(names) - set(mixer_cost.MODELS))
        if unknown:
            raise SurgeryError(f"--mixer-models {' '.join(unknown)}: unknown; choose from {' '.join(mixer_cost.MODELS)}")
        models = mixer_cost.build(names, width=args.mixer_width, depth=args.mixer_depth, max_seq=max(args.mixer_seqs))
        train = mixer_cost.train_rows(models, args.mixer_seqs, args.mixer_repeats,
                                       max_seq={"hf-mamba": args.hf_max_seq}, verbose=True)
        gen = mixer_cost.generation_rows(models, args.mixer_seqs, args.new_tokens, verbose=True)
        record["mixers"] = {"width": args.mixer_width, "depth": args.mixer_depth, "fla": mixer_cost.fla_status(),
                            "train": train, "generation": gen}
        md += ["", f"## Mixers (width {args.mixer_width}, depth {args.mixer_depth}, batch 1, CPU torch paths)", "",
               f"flash-linear-attention naive reference: {record['mixers']['fla']}", "",
               report.mixer_tables(train, gen)]
        report.plot(train, gen, args.out / "mixers.png")
        if {"mamba2", "hf-mamba2"} <= set(names):  # the mixer alone: the model rows above carry MLPs only in ours
            record["mixers"]["mamba2_mixer"] = pair = mixer_cost.mamba2_mixer_rows(args.mixer_seqs, args.mixer_width,
                                                                                    verbose=True)
            md[-1] += ("\n\nOne Mamba-2 mixer alone, forward + backward, ours vs transformers' `Mamba2Mixer` (torch path) "
                       "with the same weights (target >= 3x): " +
                       ", ".join(f"L={r['seq']}: {r['speedup_vs_hf']:.2f}x" for r in pair))
        if record["mixers"]["fla"] == "available":
            record["mixers"]["recurrence_vs_fla"] = rec = mixer_cost.recurrence_rows(args.mixer_seqs, verbose=True)
            md[-1] += ("\n\nOne layer's recurrence alone, forward + backward, (1, 4 heads, L, 32), ours "
                       "(`gla_chunked`) vs flash-linear-attention's naive torch references:\n\n" + report.recurrence_table(rec))
        print(md[-1], flush=True)
    if "gpu" in args.sections:
        if not torch.cuda.is_available():
            record["gpu"] = "skipped: torch.cuda.is_available() is False"
            md += ["", f"## GPU\n\n{record['gpu']}"]
        else:
            record["gpu"] = gpu = _gpu_section()
            md += ["", f"## GPU ({gpu['device']}), GPT-2 small shape, bf16 autocast", "",
                   gpu_cost.table(gpu["removal"], gpu["kernels"], gpu["peak_flops"])]
        print(md[-1], flush=True)
    record["machine_end"] = machine_info()
    head = (f"machine: {record['machine_start']['cpu']}, {record['machine_start']['cores']} cores, torch "
            f"{record['machine_start']['torch']} ({args.threads} thread(s)); load average at start "
            f"{record['machine_start']['loadavg']}, at end {record['machine_end']['loadavg']}")
    (args.out / "bench.md").write_text(head + "\n\n" + "\n".join(md) + "\n")
    report.write_json(record, args.out / "bench.json")
    print(head)
    print(f"wrote {args.out / 'bench.json'}, {args.out / 'bench.md'}" +
          (f", {args.out / 'mixers.png'}" if "mixers" in args.sections else ""))
    return 0
