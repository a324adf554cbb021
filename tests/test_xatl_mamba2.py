"""The Mamba-2 mixer against transformers' `Mamba2Mixer` (its pure-PyTorch path: `mamba2_chunk_scan` and
`mamba2_selective_state_update`), with every parameter randomized away from its initial value.

Tolerances: both compute in float32 on outputs of order 1 (checked); the two chunked scans sum in different orders,
so outputs agree to 2e-5 absolute and gradients to 1e-4 of each gradient's largest entry (observed ~1e-6 and ~1e-5).
"""

import pytest
import torch
from transformers import Mamba2Config
from transformers.models.mamba2 import modeling_mamba2 as hf_mamba2

from surgery.errors import SurgeryError
from surgery.xatl.mixers import build_mixer
from surgery.xatl.mixers import mamba2 as ours_mamba2
from surgery.xatl.mixers.scan import gla_recurrent, ssd_chunked

D_MODEL, HEADS = 32, 4
P = D_MODEL // HEADS


def _randomized(chunk: int = 16, n_kv_head: int | None = None, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = build_mixer("mamba2", D_MODEL, HEADS, n_kv_head=n_kv_head, chunk=chunk, **kw)
    with torch.no_grad():
        m.in_proj.weight.normal_(0, D_MODEL**-0.5)
        m.in_proj.bias.normal_(0, 0.3)
        m.conv1d.weight.normal_(0, 0.5)
        m.conv1d.bias.normal_(0, 0.3)
        m.out_proj.weight.normal_(0, D_MODEL**-0.5)
        m.out_proj.bias.normal_(0, 0.3)
        m.A_log.normal_(0, 1.0)  # decays from exp(-dt * 0.1) to exp(-dt * 7): slow and fast heads
        m.dt_bias.normal_(-1.0, 1.0)
        m.D.normal_(0, 1.0)
        m.norm.weight.normal_(1.0, 0.3)
    return m


def _hf_twin(ours: torch.nn.Module, chunk: int) -> torch.nn.Module:
    """transformers' Mamba2Mixer with our weights. Its B and C share one group count, so our x and B (n_kv_head
    groups) are repeated to one group per head, conv channels and all: the same function, laid out as HF's."""
    cfg = Mamba2Config(hidden_size=D_MODEL, num_heads=HEADS, head_dim=P, expand=1, state_size=ours.d_state,
                       n_groups=HEADS, use_bias=True, use_conv_bias=True, conv_kernel=ours.d_conv, chunk_size=chunk,
                       layer_norm_epsilon=ours.norm.eps, num_hidden_layers=1)
    ref = hf_mamba2.Mamba2Mixer(cfg, layer_idx=0)
    sd = ours.state_dict()
    rep = HEADS // ours.n_kv_head

    def groups(t, width):  # rows of n_kv_head groups of `width` -> each repeated for its heads
        return t.reshape(ours.n_kv_head, width, *t.shape[1:]).repeat_interleave(rep, 0).reshape(-1, *t.shape[1:])

    w = {k: sd[f"in_proj.{k}"].split(list(ours.widths.values())) for k in ("weight", "bias")}
    c = {k: sd[f"conv1d.{k}"].split([ours.widths[n] for n in "xBC"]) for k in ("weight", "bias")}
    for k in ("weight", "bias"):
        z, x, B, C, dt = w[k]
        sd[f"in_proj.{k}"] = torch.cat([z, groups(x, P), groups(B, ours.d_state), C, dt])
        cx, cB, cC = c[k]
        sd[f"conv1d.{k}"] = torch.cat([groups(cx, P), groups(cB, ours.d_state), cC])
    ref.load_state_dict(sd)
    return ref


@pytest.mark.parametrize("T,chunk", [(45, 16), (64, 64), (3, 8), (130, 32)])
def test_ssd_chunked_equals_the_recurrence(T, chunk):
    """float64, decays down to exp(-8) a step: same arithmetic in another order, agreement to 1e-12."""
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(2, 3, T, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v, s0 = torch.randn(2, 3, T, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    decay = -8 * torch.rand(2, 3, T, generator=g, dtype=torch.float64)
    for init in (s0, None):
        o_ref, s_ref = gla_recurrent(q, k, v, decay[..., None], init)
        o, s = ssd_chunked(q, k, v, decay, init, chunk=chunk)
        assert (o - o_ref).abs().max() < 1e-12 and (s - s_ref).abs().max() < 1e-12


@pytest.mark.parametrize("n_kv_head", [None, 2])
@pytest.mark.parametrize("T,chunk", [(1, 16), (37, 8), (64, 16), (100, 64)])
def test_outputs_and_gradients_equal_transformers_mamba2(T, chunk, n_kv_head):
    ours = _randomized(chunk, n_kv_head, seed=T)
    ref = _hf_twin(ours, chunk)
    x = torch.randn(2, T, D_MODEL, generator=torch.Generator().manual_seed(T))
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, _ = ours(x_ours)
    y_ref = ref(x_ref)
    assert y.abs().max() > 0.3
    assert (y - y_ref).abs().max() < 2e-5
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert (x_ours.grad - x_ref.grad).abs().max() < 1e-4 * x_ref.grad.abs().max()
    if n_kv_head is None:  # same parameter layout: every parameter's gradient too
        ref_grads = dict(ref.named_parameters())
        for name, p in ours.named_parameters():
            r = ref_grads[name].grad
            assert (p.grad - r).abs().max() <= 1e-4 * r.abs().max(), name


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_state_after_a_prefix_and_decoding_equal_transformers(n_kv_head):
    """Our carried SSM state after a prefix is transformers' `mamba2_chunk_scan(return_final_states=True)` state
    (layout (B, H, N, P) vs its (B, H, P, N)); our one-token steps from it equal its `mamba2_selective_state_update`."""
    ours = _randomized(8, n_kv_head, seed=5)
    ref = _hf_twin(ours, 8)
    x = torch.randn(2, 29, D_MODEL, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, (conv, S) = ours(x[:, :20])
        proj = ref.in_proj(x)
        _, xBC, dt = proj.split([ref.intermediate_size, ref.conv_dim, HEADS], dim=-1)
        xBC = torch.nn.functional.silu(ref.conv1d(xBC.transpose(1, 2))[..., :29].transpose(1, 2))
        xs, B, C = xBC.split([ref.intermediate_size, HEADS * P, HEADS * P], dim=-1)
        A = -torch.exp(ref.A_log)
        _, S_ref = hf_mamba2.mamba2_chunk_scan(xs[:, :20].unflatten(-1, (HEADS, P)), dt[:, :20], A,
                                               B[:, :20].unflatten(-1, (HEADS, P)), C[:, :20].unflatten(-1, (HEADS, P)),
                                               8, D=ref.D, dt_bias=ref.dt_bias, dt_softplus=True,
                                               return_final_states=True)
        assert (S - S_ref.transpose(-1, -2)).abs().max() < 2e-5 * S_ref.abs().max()
        state, steps = S_ref.clone(), []
        for t in range(20, 29):
            out = hf_mamba2.mamba2_selective_state_update(
                state, xs[:, t].unflatten(-1, (HEADS, P)), dt[:, t, :, None].expand(-1, -1, P),
                A[:, None, None].expand(-1, P, P), B[:, t].unflatten(-1, (HEADS, P)), C[:, t].unflatten(-1, (HEADS, P)),
                ref.D[:, None].expand(-1, P), dt_bias=ref.dt_bias[:, None].expand(-1, P), dt_softplus=True)
            steps.append(ref.out_proj(ref.norm(out.flatten(1), proj[:, t, :ref.intermediate_size])))
        mine, st = [], (conv, S)
        for t in range(20, 29):
            o, st = ours(x[:, t : t + 1], st)
            mine.append(o[:, 0])
    assert (torch.stack(mine, 1) - torch.stack(steps, 1)).abs().max() < 2e-5


@pytest.mark.parametrize("window,summary", [(0, False), (6, False), (6, True)])
@pytest.mark.parametrize("T,chunk", [(45, 16), (70, 64)])
def test_chunked_equals_recurrent_and_cached_decoding_equals_full_forward(T, chunk, window, summary):
    m = _randomized(chunk, 2, seed=T, window=window, window_summary=summary)
    x = torch.randn(2, T, D_MODEL)
    with torch.no_grad():
        y, state = m(x)
        y_rec, state_rec = m(x, recurrent=True)
        assert (y - y_rec).abs().max() < 1e-5
        for s, r in zip(state, state_rec):
            assert (s - r).abs().max() < 1e-5 * max(1.0, r.abs().max().item())
        st, outs = None, []
        for s, e in [(0, 9), *[(t, t + 1) for t in range(9, T)]]:
            o, st = m(x[:, s:e], st)
            outs.append(o)
    assert (torch.cat(outs, 1) - y).abs().max() < 1e-5


def test_windowed_mamba2_with_source_weights_starts_as_the_sources_attention():
    """Given a GPT-2 attention's (randomized) Q/K/V/O in C/B/x/out_proj, a mamba2 mixer whose window covers the
    sequence computes that attention exactly at initialisation: the SSM branch starts at zero (norm gain)."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    torch.manual_seed(3)
    T = 20
    cfg = GPT2Config(n_embd=D_MODEL, n_head=HEADS, n_positions=T, attn_pdrop=0.0, resid_pdrop=0.0)
    cfg._attn_implementation = "eager"
    attn = GPT2Attention(cfg).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    m = build_mixer("mamba2", D_MODEL, HEADS, window=T)
    slots = m.transfer_slots()
    with torch.no_grad():
        W, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D (in, out): columns Q | K | V
        for j, key in enumerate("qkv"):
            lin, rows = slots[key]
            lin.weight[rows] = W[:, j * D_MODEL : (j + 1) * D_MODEL].T
            lin.bias[rows] = b[j * D_MODEL : (j + 1) * D_MODEL]
        m.out_proj.weight.copy_(attn.c_proj.weight.T)
        m.out_proj.bias.copy_(attn.c_proj.bias)
        x = torch.randn(2, T, D_MODEL)
        ref = attn(x, attention_mask=torch.full((T, T), float("-inf")).triu(1)[None, None])[0]
        y, _ = m(x)
    assert (y - ref).abs().max() < 1e-5


def test_identity_conv_and_layout():
    m = build_mixer("mamba2", D_MODEL, HEADS, n_kv_head=2, conv_init="identity")
    w = m.conv1d.weight
    assert (w[:, 0, -1] == 1).all() and (w[:, 0, :-1] == 0).all()
    assert m.widths == {"z": 32, "x": 16, "B": 16, "C": 32, "dt": 4} and m.d_state == P
    rows = {k: (s.start, s.stop) for k, (_, s) in m.transfer_slots().items()}
    assert rows == {"o": (0, 32), "v": (32, 48), "k": (48, 64), "q": (64, 96)}


class _Boom:
    __name__ = "fake_kernel"

    def __call__(self, *a, **k):
        raise RuntimeError("no such kernel")


def test_kernel_dispatch_falls_back_loudly(monkeypatch):
    """On CPU the PyTorch path runs (scan_path says so); a kernel that fails warns and the PyTorch result stands."""
    m = _randomized(16)
    x = torch.randn(1, 10, D_MODEL)
    with torch.no_grad():
        y, _ = m(x)
        assert m.scan_path == "torch"
        monkeypatch.setattr(ours_mamba2, "cuda_kernel", lambda t, module, name: _Boom())
        with pytest.warns(UserWarning, match="CUDA kernel fake_kernel failed .*no such kernel.*; using the PyTorch path"):
            y2, _ = m(x)
    assert m.scan_path == "torch" and torch.equal(y, y2)


def test_bad_options():
    with pytest.raises(SurgeryError, match=r"^mamba2: d_model=32 must divide by n_head=4 and n_head by n_kv_head=3; "
                                           r"set n_kv_head to a divisor of n_head$"):
        build_mixer("mamba2", 32, 4, n_kv_head=3)
    with pytest.raises(SurgeryError, match="conv_init must be 'default' or 'identity', not 'eye'"):
        build_mixer("mamba2", 32, 4, conv_init="eye")
    with pytest.raises(SurgeryError, match=r"window=-2: give the number of recent tokens"):
        build_mixer("mamba2", 32, 4, window=-2)
    with pytest.raises(SurgeryError, match=r"window_summary and window_rotary act on the softmax window: set window > 0 too"):
        build_mixer("mamba2", 32, 4, window_summary=True)
