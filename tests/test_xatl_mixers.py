"""Mixers: fast (chunked) forms against sequential references, training form against generation form.

Tolerances: float64 scans agree to 1e-12 (same arithmetic, different order); float32 mixers to 1e-5 absolute
on outputs of order 1 (the issue's bar; observed ~1e-7 to 1e-6)."""

import pytest
import torch
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer as HFMambaMixer

from surgery.errors import SurgeryError
from surgery.xatl.mixers import MIXERS, build_mixer
from surgery.xatl.mixers.scan import causal_conv1d, gla_chunked, gla_recurrent, selective_scan_chunked, selective_scan_sequential, window_attention



@pytest.mark.parametrize("T,chunk", [(37, None), (37, 8), (64, 16), (5, 64), (1, None)])
def test_selective_scan_chunked_equals_sequential(T, chunk):
    g = torch.Generator().manual_seed(T)
    B, E, N = 2, 6, 4
    a = torch.rand(B, T, E, N, generator=g, dtype=torch.float64) * 0.6 + 0.4
    u, c = torch.randn(B, T, E, N, generator=g, dtype=torch.float64), torch.randn(B, T, N, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, E, N, generator=g, dtype=torch.float64)
    y_ref, h_ref = selective_scan_sequential(a, u, c, h0)
    y, h = selective_scan_chunked(a, u, c, h0, chunk=chunk)
    assert (y - y_ref).abs().max() < 1e-12 and (h - h_ref).abs().max() < 1e-12


@pytest.mark.parametrize("per_key", [True, False])
@pytest.mark.parametrize("T,chunk", [(45, 16), (32, 32), (3, 8)])
def test_gla_chunked_equals_recurrent(per_key, T, chunk):
    g = torch.Generator().manual_seed(T)
    B, H, K, V = 2, 3, 4, 5
    q, k = torch.randn(B, H, T, K, generator=g, dtype=torch.float64), torch.randn(B, H, T, K, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    # strong decays too (down to exp(-8) per step): the chunked form must not overflow
    decay = -8 * torch.rand(B, H, T, K if per_key else 1, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, K, V, generator=g, dtype=torch.float64)
    o_ref, s_ref = gla_recurrent(q, k, v, decay, s0)
    o, s = gla_chunked(q, k, v, decay, s0, chunk=chunk)
    assert (o - o_ref).abs().max() < 1e-12 and (s - s_ref).abs().max() < 1e-12


def _mixer(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_mixer(name, d_model=32, n_head=4, **kw)
    with torch.no_grad():  # weights of order 1 so that outputs are of order 1 (mamba's init gives ~1e-3)
        m.out_proj.weight.normal_(0, 32**-0.5)
        if name in ("mamba", "mamba2"):
            m.in_proj.weight.normal_(0, 32**-0.5)
        if name == "mamba":
            m.x_proj.weight.normal_(0, 0.3)
    return m


# every mixer, and the linear-attention mixers with a softmax window whose linear branch is switched on
VARIANTS = [(name, {}) for name in sorted(MIXERS)] + [("gla", {"window": 5}), ("retention", {"window": 16}),
                                                      ("mamba2", {"window": 5}),
                                                      ("gla", {"window": 5, "window_summary": True}),
                                                      ("mamba2", {"window": 5, "window_summary": True})]


def _variant(name: str, options: dict) -> torch.nn.Module:
    m = _mixer(name, **options)
    if options.get("window"):
        with torch.no_grad():
            (m.norm.weight if name == "mamba2" else m.norm_weight).normal_(1.0, 0.3)
    return m


@pytest.mark.parametrize("T", [41, 300])
@pytest.mark.parametrize("name,options", VARIANTS)
def test_chunked_form_equals_recurrent_form(name, options, T):
    """T = 300 spans several chunks of every mixer (retention's are 128 tokens)."""
    m, x = _variant(name, options), torch.randn(2, T, 32)
    y, state = m(x)
    y_rec, state_rec = m(x, recurrent=True)
    assert y.abs().max() > 0.1
    assert (y - y_rec).abs().max() < 1e-5
    for s, r in zip(state, state_rec):
        assert (s - r).abs().max() < 1e-5


@pytest.mark.parametrize("name,options", VARIANTS)
def test_token_by_token_generation_form(name, options):
    """Generation: one token at a time with a carried state of fixed size equals the full forward;
    a prefix in one call followed by single tokens as well."""
    m, x = _variant(name, options), torch.randn(2, 30, 32)
    y, _ = m(x)
    state, outs, sizes = None, [], set()
    for t in range(30):
        o, state = m(x[:, t : t + 1], state)
        outs.append(o)
        sizes.add(tuple(tuple(s.shape) for s in state))
    assert len(sizes) == 1  # the state does not grow with context
    assert (torch.cat(outs, 1) - y).abs().max() < 1e-5
    y_pre, state = m(x[:, :17])
    outs = [y_pre]
    for t in range(17, 30):
        o, state = m(x[:, t : t + 1], state)
        outs.append(o)
    assert (torch.cat(outs, 1) - y).abs().max() < 1e-5


def _window_reference(q, k, v, window):
    """Softmax over a banded causal mask on the whole sequence."""
    T = q.shape[2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (j <= i) & (j > i - window)
    return (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [1, 4, 7, 64])
def test_window_attention_equals_banded_softmax_across_calls(window):
    """In one call and split over calls at uneven points (the carried keys/values of the last window-1 tokens,
    partly empty at first), against a banded softmax over the whole sequence."""
    g = torch.Generator().manual_seed(window)
    q, k = torch.randn(2, 3, 23, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 23, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 23, 5, generator=g, dtype=torch.float64)
    ref = _window_reference(q, k, v, window)
    o, (kp, vp, filled) = window_attention(q, k, v, window)
    assert (o - ref).abs().max() < 1e-12
    assert kp.shape == (2, 3, window - 1, 4) and filled.tolist() == [min(23, window - 1)] * 2
    past, outs = None, []
    for s, e in [(0, 2), (2, 3), (3, 15), (15, 23)]:
        o, past = window_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], window, past)
        outs.append(o)
    assert (torch.cat(outs, 2) - ref).abs().max() < 1e-12


def _summary_reference(q, k, v, window):
    """Written out on the whole sequence: for query i the tokens j <= i - window become one softmax entry with
    their mean key and value and log(count) added to its score (none while there are no such tokens)."""
    T = q.shape[2]
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    band = (j <= i) & (j > i - window)
    left = (j <= i - window).to(q.dtype)
    n = left.sum(-1)[:, None]  # (T, 1)
    k_mean, v_mean = left @ k / n.clamp(min=1), left @ v / n.clamp(min=1)
    s_left = (q * k_mean).sum(-1, keepdim=True) + n.clamp(min=1).log()
    s_left = s_left.masked_fill(n == 0, float("-inf"))
    p = torch.cat([(q @ k.transpose(-1, -2)).masked_fill(~band, float("-inf")), s_left], -1).softmax(-1)
    return p[..., :-1] @ v + p[..., -1:] * v_mean


@pytest.mark.parametrize("window", [1, 4, 7, 64])
def test_window_summary_equals_its_written_out_form_across_calls(window):
    """The summary entry of the tokens that left the window, in one call and split over calls at uneven points
    (sums and count carried in the state), against the dense form; with a window of the whole sequence it is
    plain causal softmax attention."""
    g = torch.Generator().manual_seed(100 + window)
    q, k = torch.randn(2, 3, 23, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 23, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 23, 5, generator=g, dtype=torch.float64)
    ref = _summary_reference(q, k, v, window)
    o, past = window_attention(q, k, v, window, summary=True)
    assert (o - ref).abs().max() < 1e-12
    assert past[5].tolist() == [max(0, 23 - (window - 1))] * 2
    assert torch.allclose(past[3], k[:, :, : max(0, 23 - (window - 1))].sum(2))
    past, outs = None, []
    for s, e in [(0, 2), (2, 3), (3, 15), (15, 23)]:
        o, past = window_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], window, past, summary=True)
        outs.append(o)
    assert (torch.cat(outs, 2) - ref).abs().max() < 1e-12
    if window >= 23:
        assert (ref - _window_reference(q, k, v, window)).abs().max() < 1e-12
    else:  # the left-out tokens change the output
        assert (ref - _window_reference(q, k, v, window)).abs().max() > 1e-2


def test_windowed_mixer_with_source_weights_starts_as_the_sources_attention():
    """A GLA mixer with a window >= T given a GPT-2 attention's Q/K/V/O (randomized) computes that attention
    exactly at initialisation (its linear branch starts at zero); a shorter window cuts the attention there."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

    torch.manual_seed(3)
    d, T = 32, 20
    cfg = GPT2Config(n_embd=d, n_head=4, n_positions=T, attn_pdrop=0.0, resid_pdrop=0.0)
    cfg._attn_implementation = "eager"
    attn = GPT2Attention(cfg).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, T, d)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    ref = attn(x, attention_mask=causal)[0]
    for window in (T, 6):
        m = build_mixer("gla", d, 4, key_dim=d, window=window)
        with torch.no_grad():
            W, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: (in, out), columns Q | K | V
            for j, lin in enumerate([m.q_proj, m.k_proj, m.v_proj]):
                lin.weight.copy_(W[:, j * d : (j + 1) * d].T)
                lin.bias.copy_(b[j * d : (j + 1) * d])
            m.out_proj.weight.copy_(attn.c_proj.weight.T)
            m.out_proj.bias.copy_(attn.c_proj.bias)
            y, _ = m(x)
        same = (y - ref).abs().amax(dim=(0, 2))  # per position
        if window == T:
            assert same.max() < 1e-5
        else:  # positions that see no more than the window agree, later ones differ
            assert same[:window].max() < 1e-5 and same[window:].min() > 1e-3


def test_mamba_matches_transformers_mamba_mixer():
    """Our Mamba mixer computes what transformers' MambaMixer (its pure-PyTorch path) computes."""
    ours = _mixer("mamba", d_state=8, d_conv=4, expand=2, dt_rank=4)
    cfg = MambaConfig(hidden_size=32, state_size=8, expand=2, conv_kernel=4, time_step_rank=4, use_bias=False,
                      use_conv_bias=True)
    ref = HFMambaMixer(cfg, layer_idx=0)
    state = {k: v for k, v in ours.state_dict().items() if k != "out_proj.bias"}
    ref.load_state_dict(state)
    x = torch.randn(2, 23, 32)
    with torch.no_grad():
        y_ref = ref(x)
        y, _ = ours(x)
    assert (y - y_ref).abs().max() < 1e-5


def test_mamba_identity_conv_passes_each_position_through():
    """conv_init="identity": the causal conv returns its input (also with a carried conv state), so a value
    projection copied into in_proj reaches the scan as it is; the default initialisation mixes neighbours."""
    g = torch.Generator().manual_seed(1)
    x, past = torch.randn(2, 32, 9, generator=g), torch.randn(2, 32, 3, generator=g)
    for init, same in (("identity", True), ("default", False)):
        m = build_mixer("mamba", d_model=32, n_head=4, d_state=4, d_conv=4, expand=1, conv_init=init)
        for state in (None, past):
            y, _ = causal_conv1d(x, m.conv1d.weight, m.conv1d.bias, state)
            assert ((y - x).abs().max() < 1e-7) == same, (init, state is None)
    with pytest.raises(SurgeryError, match="conv_init must be 'default' or 'identity', not 'eye'"):
        build_mixer("mamba", 32, 4, conv_init="eye")


def test_unknown_mixer_and_bad_options():
    with pytest.raises(SurgeryError, match="unknown mixer 'lstm'; choose one of: gla, mamba, mamba2, retention"):
        build_mixer("lstm", 32, 4)
    with pytest.raises(SurgeryError, match="must both divide by n_head=5"):
        build_mixer("retention", 32, 5)
    # A misspelt setting is refused by name, not dropped (each mixer used to take **kwargs and ignore them).
    with pytest.raises(SurgeryError, match=r"^mixer_config key 'd_stat' is not a setting of mixer 'mamba' \(did you mean "
                                           r"'d_state'\?\); its settings: d_state, d_conv, expand, dt_rank, chunk, conv_init$"):
        build_mixer("mamba", 32, 4, d_stat=8)
    with pytest.raises(SurgeryError, match=r"key 'gate_rnk' is not a setting of mixer 'gla' \(did you mean 'gate_rank'\?\); "
                                           r"its settings: key_dim, gate_rank, gate_norm, chunk, window, window_summary, window_rotary$"):
        build_mixer("gla", 32, 4, gate_rnk=8)
    with pytest.raises(SurgeryError, match=r"key 'd_state' is not a setting of mixer 'retention'; its settings: chunk, key_dim, window, window_summary, window_rotary$"):
        build_mixer("retention", 32, 4, d_state=8)
    with pytest.raises(SurgeryError, match=r"window=-1: give the number of recent tokens"):
        build_mixer("gla", 32, 4, window=-1)
    assert build_mixer("mamba", 32, 4, d_state=4).d_state == 4 and build_mixer("gla", 32, 4, gate_rank=4, chunk=8).chunk == 8
