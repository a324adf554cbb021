"""The GPU benchmark's arithmetic and bookkeeping, run on CPU at toy sizes (bf16 autocast works on CPU):
FLOPs per token, MFU, the batch search stopping at the first out-of-memory, kernel-vs-torch rows."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks import gpu_cost

CPU = torch.device("cpu")


def toy() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, eos_token_id=0)


def test_model_flops_count_matmul_parameters_and_attention():
    cfg = toy()
    model = GPT2LMHeadModel(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied wte counted once
    assert gpu_cost.model_flops_per_token(cfg, model, 16) == 6 * (n - 32 * 32) + 12 * 2 * 32 * 16


def test_removal_rows_mfu_is_model_flops_times_throughput_over_peak():
    rows = gpu_cost.removal_rows(toy(), seq=16, batch=2, device=CPU, dtype=torch.bfloat16, repeats=2, peak_flops=1e9)
    assert [r["phase"] for r in rows] == ["before", "during", "after"]
    for r in rows:
        assert r["plain_tok_s"] == pytest.approx(32 / r["plain_s"])
        assert r["removal_mfu"] == pytest.approx(r["flops_per_token"] * r["removal_tok_s"] / 1e9)
    assert "| after | 2 x 16 |" in gpu_cost.table(rows, [], 1e12)


def test_largest_batch_stops_at_the_first_out_of_memory(monkeypatch):
    real = gpu_cost._steppers

    def steppers(cfg, batch, *args):
        if batch > 4:
            raise torch.OutOfMemoryError("toy limit")
        return real(cfg, batch, *args)

    monkeypatch.setattr(gpu_cost, "_steppers", steppers)
    assert gpu_cost.largest_batch(toy(), 8, CPU, torch.bfloat16, limit=64) == 4


def test_kernel_rows_compare_the_same_model_with_and_without_kernels():
    rows = gpu_cost.kernel_rows(mixers=("mamba", "mamba2", "gla"), seqs=(16,), width=32, depth=1, heads=2, device="cpu",
                                dtype=torch.bfloat16, repeats=2)
    assert [(r["mixer"], r["seq"]) for r in rows] == [("mamba", 16), ("mamba2", 16), ("gla", 16)]
    for r in rows:
        assert r["kernel_tok_s"] == pytest.approx(16 / r["kernel_s"]) and r["speedup"] > 0


def test_torch_paths_only_hides_the_kernels_inside_the_block(monkeypatch):
    from types import SimpleNamespace

    from surgery.xatl.mixers import kernels

    monkeypatch.setattr(kernels, "_load", lambda module, name: "kernel")
    on_gpu = SimpleNamespace(is_cuda=True)
    assert kernels.cuda_kernel(on_gpu, "m", "f") == "kernel"
    with kernels.torch_paths_only():
        assert kernels.cuda_kernel(on_gpu, "m", "f") is None
    assert kernels.cuda_kernel(on_gpu, "m", "f") == "kernel"
    assert kernels.cuda_kernel(SimpleNamespace(is_cuda=False), "m", "f") is None
