"""On a GPU: LN-removal training in bf16 against plain training, with model FLOPs utilisation, and the
mamba-ssm / flash-linear-attention kernels against our pure-PyTorch mixer paths.

MFU = model FLOPs per token x tokens/s / peak, where model FLOPs per token = 6 N + 12 n_layer d T
(N: parameters taking part in matmuls, i.e. all but the position embeddings; the tied embedding counts
once, as the LM head; the second term is attention's QK^T and AV, forward and backward, PaLM appendix B)
and the peak is the bf16 matmul throughput measured on the same card in the same run (largest of a few
square sizes), not the datasheet figure. Everything is written against a `device` argument, so the same
code runs at toy sizes on CPU (tests) and at GPT-2-small size on CUDA.
"""

from __future__ import annotations

import contextlib
import time
import warnings

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.measure import interleaved, paired_ratio
from benchmarks.removal_cost import Stepper, set_phase
from surgery.remove_ln.points import prepare_for_removal
from surgery.xatl.mixers.kernels import cuda_kernel, torch_paths_only
from surgery.xatl.mixers.mamba import MambaMixer
from surgery.xatl.mixers.mamba2 import MAMBA_SSM, Mamba2Mixer
from surgery.xatl.hybrid.model import HybridGPT2LMHeadModel, hybrid_config_from

TARGET_MFU = 0.45


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype=torch.bfloat16, sizes=(4096, 8192), iters: int = 20) -> float:
    """Best measured FLOP/s of an (n, n) @ (n, n) matmul over `sizes`."""
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - start))
        del a, b
    return best


def model_flops_per_token(cfg: GPT2Config, model: torch.nn.Module, seq: int) -> float:
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq


class Bf16Step:
    """`Stepper`'s step with the forward under autocast (bf16 on CUDA), on a (batch, seq) batch on `device`."""

    def __init__(self, stepper: Stepper, device: torch.device, dtype):
        self.stepper, self.device, self.dtype = stepper, device, dtype

    def __call__(self) -> float:
        with torch.autocast(self.device.type, dtype=self.dtype):
            loss = self.stepper()  # float(): waits for the step to finish
        return loss


def _steppers(cfg: GPT2Config, batch: int, seq: int, device: torch.device, dtype, phase: str):
    torch.manual_seed(0)
    plain_model = GPT2LMHeadModel(cfg).to(device)
    removal_model = GPT2LMHeadModel(cfg)
    removal_model.load_state_dict(plain_model.state_dict())
    points = prepare_for_removal(removal_model)
    removal_model.to(device)  # after preparing: the switchable LNs' buffers are created on the CPU
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    eos = cfg.eos_token_id or 0
    ids[:, seq // 2] = eos
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        removal_model.train()(ids)  # moving averages measured, so any point can go fake
    set_phase(points, phase, cfg.n_layer)
    return (Bf16Step(Stepper(plain_model, ids, eos), device, dtype),
            Bf16Step(Stepper(removal_model, ids, eos, points), device, dtype), plain_model)


def largest_batch(cfg: GPT2Config, seq: int, device: torch.device, dtype, start: int = 1, limit: int = 256) -> int:
    """Largest power-of-two batch (>= start, <= limit) whose removal *and* plain steps both fit in memory."""
    best, batch = 0, start
    while batch <= limit:
        try:
            plain, removal, _ = _steppers(cfg, batch, seq, device, dtype, "before")
            plain(), removal()
            best = batch
        except torch.OutOfMemoryError:
            break
        finally:
            plain = removal = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    return best


def removal_rows(cfg: GPT2Config, seq: int, batch: int, device: torch.device, dtype, repeats: int = 5,
                 peak_flops: float | None = None, phases=("before", "during", "after")) -> list[dict]:
    """Per phase: plain and removal step time (interleaved), tokens/s, paired ratio, and MFU when
    `peak_flops` is given. One row per phase."""
    rows = []
    for phase in phases:
        plain, removal, model = _steppers(cfg, batch, seq, device, dtype, phase)
        flops = model_flops_per_token(cfg, model, seq)
        t = interleaved({"plain": plain, "removal": removal}, repeats, warmup=2, memory=False)
        tokens = batch * seq
        row = {"phase": phase, "batch": batch, "seq": seq, "plain_s": t["plain"]["median_s"],
               "removal_s": t["removal"]["median_s"], "ratio": paired_ratio(t, "removal", "plain"),
               "plain_tok_s": tokens / t["plain"]["median_s"], "removal_tok_s": tokens / t["removal"]["median_s"],
               "flops_per_token": flops}
        if peak_flops:
            row["plain_mfu"] = flops * row["plain_tok_s"] / peak_flops
            row["removal_mfu"] = flops * row["removal_tok_s"] / peak_flops
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(row)
        plain = removal = model = None
    return rows


def kernel_of(model: torch.nn.Module) -> str | None:
    """"module.name" of the CUDA kernel the model's mixers look up (mamba.py names mamba-ssm's scan inline;
    the linear-attention mixers carry `fla_kernel`; mamba2 tries mamba-ssm's SSD kernel first, and its `scan_path`
    says which ran), or None for a mixer without one."""
    for m in model.modules():
        if isinstance(m, Mamba2Mixer):
            return ".".join(MAMBA_SSM)
        if isinstance(m, MambaMixer):
            return "mamba_ssm.ops.selective_scan_interface.selective_scan_fn"
        if getattr(m, "fla_kernel", None):
            return ".".join(m.fla_kernel)
    return None


def kernel_rows(mixers=("mamba", "mamba2", "retention", "gla"), seqs=(1024, 4096), width: int = 768, depth: int = 12,
                heads: int = 12, device: torch.device | str = "cuda", dtype=torch.bfloat16, repeats: int = 3) -> list[dict]:
    """Training step (forward, backward, AdamW) of each hybrid with its CUDA kernels vs with
    `torch_paths_only()`, same model, same batch (1, T). One row per (mixer, seq).

    `kernel_loaded` says whether the kernel imported on this device and `kernel_fallbacks` counts the
    timed kernel-side calls that failed and fell back to PyTorch: where the kernel did not load or fell back,
    "kernel" times the PyTorch path too and the speed-up is no kernel's."""
    device = torch.device(device)
    rows = []
    for mixer in mixers:
        cfg = GPT2Config(n_layer=depth, n_embd=width, n_head=heads, n_positions=max(seqs), vocab_size=50257)
        torch.manual_seed(0)
        model = HybridGPT2LMHeadModel(hybrid_config_from(cfg, mixer)).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        name = kernel_of(model)
        loaded = name is not None and cuda_kernel(torch.empty(0, device=device), *name.rsplit(".", 1)) is not None
        for seq in seqs:
            ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device)

            def step(torch_only: bool) -> float:
                opt.zero_grad(set_to_none=True)
                with torch_paths_only() if torch_only else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=dtype):
                        loss = model(ids, labels=ids).loss
                    loss.backward()
                opt.step()
                return float(loss.detach())

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t = interleaved({"kernel": lambda: step(False), "torch": lambda: step(True)}, repeats, 1, memory=False)
            fallbacks = [str(w.message) for w in caught if str(w.message).startswith("CUDA kernel")]
            rows.append({"mixer": mixer, "seq": seq, "kernel": name, "kernel_loaded": loaded,
                         "kernel_fallbacks": len(fallbacks), "fallback_message": fallbacks[0] if fallbacks else None,
                         "kernel_s": t["kernel"]["median_s"], "torch_s": t["torch"]["median_s"],
                         "speedup": paired_ratio(t, "torch", "kernel"),
                         "kernel_tok_s": seq / t["kernel"]["median_s"], "torch_tok_s": seq / t["torch"]["median_s"]})
        model = opt = None
    return rows


def table(removal: list[dict], kernels: list[dict], peak_flops: float | None) -> str:
    head = f"bf16 matmul peak measured: {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "no peak measured"
    lines = [head, "", "| phase | batch x seq | plain tok/s | removal tok/s | ratio | plain MFU | removal MFU |",
             "|---|---|---|---|---|---|---|"]
    for r in removal:
        mfu = [f"{100 * r[k]:.1f}%" if k in r else "-" for k in ("plain_mfu", "removal_mfu")]
        lines.append(f"| {r['phase']} | {r['batch']} x {r['seq']} | {r['plain_tok_s']:.0f} | {r['removal_tok_s']:.0f} "
                     f"| {r['ratio']:.3f}x | {mfu[0]} | {mfu[1]} |")
    if kernels:
        lines += ["", "| mixer | L | kernel tok/s | torch tok/s | kernel speed-up |", "|---|---|---|---|---|"]
        for r in kernels:
            ran = r.get("kernel_loaded", True) and not r.get("kernel_fallbacks")
            speedup = f"{r['speedup']:.1f}x" if ran else f"- (kernel {'fell back' if r.get('kernel_loaded') else 'not loaded'})"
            lines.append(f"| {r['mixer']} | {r['seq']} | {r['kernel_tok_s']:.0f} | {r['torch_tok_s']:.0f} | {speedup} |")
    return "\n".join(lines)
