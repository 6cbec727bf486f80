"""The Triton depthwise convolution, run on CPU by Triton's interpreter, against PyTorch's: forward and every
gradient, on each layout, in float32 and bfloat16; and MUSE's convolution branch on it."""
import os

import pytest
import torch

from muse_lightning import MUSEAttention, conv

triton_conv = pytest.importorskip("muse_lightning.triton_conv")  # triton ships with PyPI's torch
# conftest.py turns Triton's interpreter on before triton is imported, and the kernels run on CPU tensors; with
# TRITON_INTERPRET=0 on a GPU machine (scripts/gpu_check.sh) they are compiled and run on CUDA tensors.
DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else ["cuda"] * torch.cuda.is_available()

# (B, H, W, C, KH, KW, pad_h, pad_w): a sequence centred and causal, grids with 3 x 3 and 5 x 5 kernels; widths
# and channels that are not multiples of the tiles (16 tokens, 64 channels).
LAYOUTS = {
    "1d": (2, 1, 21, 70, 1, 5, 0, 2),
    "1d-causal": (2, 1, 21, 70, 1, 5, 0, 4),
    "2d-3x3": (2, 5, 6, 33, 3, 3, 1, 1),
    "2d-5x5": (1, 4, 17, 20, 5, 5, 2, 2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_triton_conv_and_its_gradients_match_pytorch(layout, dtype, device):
    B, H, W, C, KH, KW, ph, pw = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(0)
    v, k, b = (torch.randn(*shape, generator=gen).to(device, dtype).requires_grad_() for shape in
               ((B, H * W, C), (C, KH, KW), (C,)))
    grad = torch.randn(B, H * W, C, generator=gen).to(device, dtype)
    out = triton_conv.depthwise_conv(v, k, b, H, ph, pw)
    grads = torch.autograd.grad(out, (v, k, b), grad)
    # The reference in float32 from the same (rounded) inputs.
    v32, k32, b32 = (t.detach().float().requires_grad_() for t in (v, k, b))
    ref = triton_conv.reference_depthwise_conv(v32, k32, b32, H, ph, pw)
    ref_grads = torch.autograd.grad(ref, (v32, k32, b32), grad.float())
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.float(), ref, **tol)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), expected, **(tol if dtype == torch.float32 else dict(
            atol=0.02 * expected.abs().max().item(), rtol=0.02)))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_conv_compiles_fullgraph_forward_and_backward(device):
    B, H, W, C, KH, KW, ph, pw = LAYOUTS["2d-3x3"]
    v = torch.randn(B, H * W, C, device=device, requires_grad=True)
    k, b = torch.randn(C, KH, KW, device=device), torch.randn(C, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(lambda v: triton_conv.depthwise_conv(v, k, b, H, ph, pw), fullgraph=True)
    out = compiled(v)
    (grad,) = torch.autograd.grad(out.square().sum(), v)
    v2 = v.detach().requires_grad_()
    ref = triton_conv.reference_depthwise_conv(v2, k, b, H, ph, pw)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), v2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grad, ref_grad, atol=1e-3, rtol=1e-4)


def test_triton_conv_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"kernel \(C, KH, KW\)"):
        triton_conv.depthwise_conv(torch.randn(1, 6, 4), torch.randn(3, 1, 3), torch.randn(4), 1, 0, 1)
    with pytest.raises(ValueError, match="grid_h=4 does not divide the 6 tokens"):
        triton_conv.depthwise_conv(torch.randn(1, 6, 4), torch.randn(4, 3, 3), torch.randn(4), 4, 1, 1)


@pytest.mark.parametrize(("options", "call"), [
    (dict(conv_layout="1d"), dict(key_padding_mask=torch.tensor([[False] * 10 + [True] * 3, [False] * 13]))),
    (dict(conv_layout="1d"), dict(is_causal=True)),
    (dict(conv_layout="2d", num_prefix_tokens=1), dict(grid_size=(3, 4))),
    (dict(conv_layout="1d", conv_proj="per_kernel"), {}),
], ids=["padding", "causal", "2d-prefix", "per-kernel"])
@pytest.mark.parametrize("device", DEVICES)
def test_muse_attention_on_the_triton_backend_equals_the_pytorch_one(monkeypatch, options, call, device):
    torch.manual_seed(0)
    mixer = MUSEAttention(32, num_heads=4, kernel_sizes=(1, 3, 5), **options).to(device)
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0, 0.2)  # a trained branch: gate, kernels and projections all matter
    x = torch.randn(2, 13, 32, device=device)
    call = {k: v.to(device) if torch.is_tensor(v) else v for k, v in call.items()}

    def run():
        mixer.zero_grad()
        out = mixer(x, **call)
        out.square().sum().backward()
        return out, {n: p.grad.clone() for n, p in mixer.named_parameters()}

    ref, ref_grads = run()
    monkeypatch.setattr(conv, "CONV_BACKEND", "triton")
    out, grads = run()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys() and any(".gate" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-4, msg=name)
