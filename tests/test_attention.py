"""Behaviour of MUSEAttention: masks, causality, gradients, numerics, compile, init."""
import pytest
import torch
import torch.nn.functional as F
from conftest import make_mixer
from timm.layers import Attention
from timm.models.vision_transformer import init_weights_vit_timm

from muse_lightning import MixerOptions, MUSEAttention


def test_output_has_input_shape_and_is_finite(variant):
    x = torch.randn(2, 9, 32)
    y = make_mixer(**variant)(x)
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_alone_equals_sequence_padded_in_batch(variant, is_causal, side):
    mixer = make_mixer(**variant).eval()
    lengths, n = [9, 4, 6], 9
    seqs = [torch.randn(1, L, 32) for L in lengths]
    batch = torch.randn(len(lengths), n, 32) * 100  # loud garbage in the padding
    padding = torch.ones(len(lengths), n, dtype=torch.bool)
    for i, (s, L) in enumerate(zip(seqs, lengths)):
        pos = slice(0, L) if side == "right" else slice(n - L, n)
        batch[i, pos], padding[i, pos] = s[0], False
    out = mixer(batch, is_causal=is_causal, key_padding_mask=padding)
    for i, (s, L) in enumerate(zip(seqs, lengths)):
        pos = slice(0, L) if side == "right" else slice(n - L, n)
        torch.testing.assert_close(out[i, pos], mixer(s, is_causal=is_causal)[0], atol=1e-5, rtol=1e-5)
        assert (out[i][padding[i]] == 0).all()


@pytest.mark.parametrize("is_causal", [False, True])
def test_fully_padded_row_gives_finite_values_and_gradients(variant, is_causal):
    mixer = make_mixer(**variant)
    x = torch.randn(2, 6, 32, requires_grad=True)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1] = True
    padding[0, :2] = True  # left padding: under a causal mask its rows see no key at all
    y = mixer(x, is_causal=is_causal, key_padding_mask=padding)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


@pytest.mark.parametrize("with_padding", [False, True])
def test_causal_output_ignores_future_tokens(variant, with_padding):
    mixer = make_mixer(**variant)
    x = torch.randn(2, 12, 32)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 10:] = with_padding
    t = 6
    changed = x.clone()
    changed[:, t + 1:] = torch.randn(2, 12 - t - 1, 32)
    y, y_changed = (mixer(z, is_causal=True, key_padding_mask=padding) for z in (x, changed))
    torch.testing.assert_close(y[:, : t + 1], y_changed[:, : t + 1], atol=1e-6, rtol=1e-6)
    # Without is_causal the same change reaches position t (through attention and convolution).
    assert not torch.allclose(mixer(x, key_padding_mask=padding)[:, t], mixer(changed, key_padding_mask=padding)[:, t])


def test_causal_convolution_alone_ignores_future_tokens(variant):
    conv = make_mixer(**variant).conv
    v = torch.randn(2, 12, 32)
    changed = v.clone()
    changed[:, 7:] += 1.0
    torch.testing.assert_close(conv(v, is_causal=True)[:, :7], conv(changed, is_causal=True)[:, :7])
    assert not torch.allclose(conv(v)[:, 6], conv(changed)[:, 6])


def test_every_parameter_gets_gradient_and_is_updated(variant):
    mixer = make_mixer(**variant)
    before = {n: p.detach().clone() for n, p in mixer.named_parameters()}
    opt = torch.optim.SGD(mixer.parameters(), lr=0.1)
    x = torch.randn(2, 9, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 7:] = True
    (mixer(x, key_padding_mask=padding) ** 2).sum().backward()
    for name, p in mixer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for name, p in mixer.named_parameters():
        assert not torch.equal(p, before[name]), name


def test_forward_never_creates_or_replaces_parameters(variant):
    mixer = make_mixer(**variant)
    params = {n: p for n, p in mixer.named_parameters()}
    gate = mixer.conv.gate.detach().clone()
    for _ in range(2):
        mixer(torch.randn(2, 5, 32), is_causal=True).sum().backward()
    assert {n: p for n, p in mixer.named_parameters()}.keys() == params.keys()
    assert all(p is params[n] for n, p in mixer.named_parameters())
    assert torch.equal(mixer.conv.gate, gate)  # the gate is softmaxed on the fly, never overwritten


def test_gate_trains_towards_the_useful_kernel():
    """Kernels fixed to identity (k=1) and a box filter (k=5): fitting a box-filtered target moves the gate."""
    conv = MUSEAttention(16, 2, mixer=MixerOptions((1, 5))).conv
    with torch.no_grad():
        conv.weight[0].fill_(1.0)
        conv.weight[1].fill_(0.2)
        conv.bias.zero_()
    v = torch.randn(8, 20, 16)
    target = F.conv1d(v.transpose(1, 2), torch.full((16, 1, 5), 0.2), padding=2, groups=16).transpose(1, 2)
    opt = torch.optim.Adam([conv.gate], lr=0.1)
    assert torch.equal(conv.gate.softmax(0), torch.full((2,), 0.5))
    for _ in range(100):
        opt.zero_grad()
        F.mse_loss(conv(v), target).backward()
        opt.step()
    assert conv.gate.softmax(0)[1] > 0.95


def test_default_mixer_has_no_unused_parameters_under_ddp(tmp_path):
    """DDP without find_unused_parameters fails on the second step if any parameter went unused."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(MUSEAttention(32, 4), find_unused_parameters=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(2, 7, 32)).pow(2).mean().backward()
            opt.step()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("masks", ["none", "padding+causal"])
def test_float64_gradcheck(variant, masks):
    mixer = make_mixer(16, 2, **variant).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64, requires_grad=True)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2]) if masks != "none" else None
    names = [n for n, _ in mixer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in mixer.parameters()]

    def fn(x, *params):
        state = dict(zip(names, params))
        return torch.func.functional_call(mixer, state, (x,), {"is_causal": masks != "none", "key_padding_mask": padding})

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


def test_bf16_autocast_matches_float32(variant):
    mixer = make_mixer(**variant)
    x = torch.randn(2, 9, 32)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    ref = mixer(x, key_padding_mask=padding, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mixer(x, key_padding_mask=padding, is_causal=True)
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    assert all(torch.isfinite(p.grad).all() for p in mixer.parameters())


@pytest.mark.parametrize("conv_type", ["static", "dynamic"])
def test_compiled_fullgraph_matches_eager(conv_type):
    torch._dynamo.reset()
    mixer = make_mixer(16, 2, mixer=MixerOptions(conv_type=conv_type))
    compiled = torch.compile(mixer, fullgraph=True)  # fullgraph: any graph break is an error
    x = torch.randn(2, 6, 16, requires_grad=True)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    for kwargs in ({}, {"key_padding_mask": padding, "is_causal": True}):
        eager = mixer(x, **kwargs)
        (grad_eager,) = torch.autograd.grad(eager.sum(), x)
        out = compiled(x, **kwargs)
        (grad_compiled,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_compiled, grad_eager, atol=1e-5, rtol=1e-5)


def test_attention_branch_is_timms_and_conv_reads_the_shared_value_projection():
    """MUSE = timm Attention (same qkv/proj weights) + conv_proj(conv(v)), v the qkv value slice."""
    mixer = make_mixer(32, 4)
    timm_attn = Attention(32, 4, qkv_bias=True)
    timm_attn.load_state_dict({k: v for k, v in mixer.state_dict().items() if k.startswith(("qkv", "proj"))})
    x = torch.randn(2, 9, 32)
    v = F.linear(x, mixer.qkv.weight[64:], mixer.qkv.bias[64:])
    expected = timm_attn(x) + mixer.conv_proj(mixer.conv(v))
    torch.testing.assert_close(mixer(x), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["padding", "causal", "padding+causal", "bool attn_mask", "float attn_mask"])
def test_unfused_attention_matches_fused(variant, mask_kind):
    mixer = make_mixer(**variant)
    x = torch.randn(2, 8, 32)
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 5:] = True
    allowed = torch.rand(2, 1, 8, 8) > 0.3
    kwargs = {
        "padding": {"key_padding_mask": padding},
        "causal": {"is_causal": True},
        "padding+causal": {"key_padding_mask": padding, "is_causal": True},
        "bool attn_mask": {"attn_mask": allowed},
        "float attn_mask": {"attn_mask": torch.zeros(2, 1, 8, 8).masked_fill(~allowed, float("-inf"))},
    }[mask_kind]
    assert mixer.fused_attn
    fused = mixer(x, **kwargs)
    mixer.fused_attn = False
    torch.testing.assert_close(mixer(x, **kwargs), fused, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fused).all()


def test_bool_and_additive_attn_masks_agree_and_combine_with_padding():
    mixer = make_mixer()
    x = torch.randn(2, 8, 32)
    allowed = torch.rand(2, 1, 8, 8) > 0.3
    additive = torch.zeros(2, 1, 8, 8).masked_fill(~allowed, float("-inf"))
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[0, 6:] = True
    torch.testing.assert_close(mixer(x, attn_mask=allowed), mixer(x, attn_mask=additive))
    both = mixer(x, attn_mask=allowed, key_padding_mask=padding)
    torch.testing.assert_close(both, mixer(x, attn_mask=allowed & ~padding[:, None, None, :], key_padding_mask=padding))


def test_init_follows_timm_conventions():
    mixer = MUSEAttention(384, 6, qkv_bias=True)
    for layer in (mixer.qkv, mixer.proj, mixer.conv_proj):
        assert abs(layer.weight.std().item() - 0.02) < 0.002  # trunc normal, std 0.02
        assert layer.bias is None or (layer.bias == 0).all()
    assert (mixer.conv.gate == 0).all()  # softmax gate starts uniform
    # The output is on the scale of timm's Attention under timm's ViT init, not ~0 as with std=0.001.
    timm_attn = Attention(384, 6, qkv_bias=True)
    timm_attn.apply(init_weights_vit_timm)
    x = torch.randn(4, 50, 384)
    ratio = mixer(x).std() / timm_attn(x).std()
    assert 0.8 < ratio < 3.0


def test_timm_init_hook_reinitialises_through_init_weights():
    mixer = MUSEAttention(64, 4, qkv_bias=True)
    with torch.no_grad():
        for p in mixer.parameters():
            p.fill_(1.0)
    init_weights_vit_timm(mixer)
    assert (mixer.conv.gate == 0).all() and (mixer.qkv.bias == 0).all()
    assert abs(mixer.qkv.weight.std().item() - 0.02) < 0.003


def test_conv_type_none_is_timms_attention_with_muse_masking():
    mixer = make_mixer(32, 4, mixer=MixerOptions(conv_type="none"))
    assert mixer.conv is None and mixer.conv_proj is None
    timm_attn = Attention(32, 4, qkv_bias=True)
    timm_attn.load_state_dict(mixer.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(mixer(x), timm_attn(x))
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    torch.testing.assert_close(mixer(x, key_padding_mask=padding)[1, :6], mixer(x[1:, :6])[0], atol=1e-5, rtol=1e-5)
