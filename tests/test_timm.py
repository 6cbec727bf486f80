"""timm integration: attn_layer / block_fn hooks, registered muse_vit_* models, swap_attention."""
import copy

import pytest
import timm
import torch

from muse_lightning import MUSEAttention, MUSEBlock

REGISTERED = [
    "muse_vit_tiny_patch16_224", "muse_vit_small_patch16_224", "muse_vit_base_patch16_224",
    "muse_vit_tiny_patch4_28", "muse_vit_tiny_convstem_28", "muse_vit_tiny_patch4_32",
]
SMALL = ["muse_vit_tiny_patch4_28", "muse_vit_tiny_convstem_28", "muse_vit_tiny_patch4_32"]


def _input(model, batch=2, size=None):
    chans, h, w = model.pretrained_cfg["input_size"]
    return torch.randn(batch, chans, *(size or (h, w)))


def test_timm_attn_layer_hook_builds_a_vit_of_muse_mixers():
    model = timm.create_model("vit_small_patch16_224", attn_layer=MUSEAttention, depth=2)
    assert all(type(b.attn) is MUSEAttention for b in model.blocks)
    assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_timm_block_fn_takes_muse_block():
    model = timm.create_model("vit_tiny_patch16_224", block_fn=MUSEBlock, depth=2, img_size=32, patch_size=8)
    assert all(type(b) is MUSEBlock and type(b.attn) is MUSEAttention for b in model.blocks)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_muse_block_rejects_a_non_muse_attn_layer():
    with pytest.raises(ValueError, match="attn_layer must be MUSEAttention"):
        MUSEBlock(32, 4, attn_layer=torch.nn.Identity)


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_model_builds_and_classifies(name):
    model = timm.create_model(name, depth=2).eval()
    assert timm.is_model(name) and name in timm.list_models("muse_vit_*")
    assert model.global_pool == "avg" and model.num_prefix_tokens == 0
    assert all(b.attn.conv_layout == "2d" and b.attn.num_prefix_tokens == 0 for b in model.blocks)
    out = model(_input(model, batch=1))
    assert out.shape == (1, model.pretrained_cfg["num_classes"]) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", SMALL)
def test_registered_model_backward_reaches_every_parameter(name):
    model = timm.create_model(name, depth=2)
    model(_input(model)).logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_convstem_model_makes_the_patch_grid_with_overlapping_convolutions_of_the_given_widths():
    model = timm.create_model("muse_vit_tiny_convstem_28", depth=2, embed_dim=64, num_heads=2, stem_chs=16).eval()
    convs = [m for m in model.patch_embed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [(16, (3, 3), (2, 2)), (64, (3, 3), (2, 2))]
    x = _input(model)
    assert model.forward_features(x).shape == (2, 49, 64)
    assert all(b.attn.grid_size == (7, 7) for b in model.blocks)
    # Overlap: pixel (3, 3), the corner of the first 4 x 4 patch, reaches the four tokens around it.
    x2 = x.clone()
    x2[..., 3, 3] += 1.0
    changed = (model.patch_embed(x2) - model.patch_embed(x)).abs().sum(-1).view(2, 7, 7)[0] > 0
    assert changed[:2, :2].all() and changed.sum() == 4


def test_registered_model_with_class_token_head_gives_every_parameter_a_gradient():
    """timm's check: no parameter is left without a gradient (the last block's convolution then
    reaches no logit, the class token being attention-only, so its gradient is zero)."""
    model = timm.create_model("muse_vit_tiny_patch4_28", depth=2, class_token=True, global_pool="token")
    assert all(b.attn.num_prefix_tokens == 1 for b in model.blocks)
    model(_input(model)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", SMALL)
def test_registered_model_features_head_and_classifier_reset(name):
    model = timm.create_model(name, depth=2).eval()
    x = _input(model)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.patch_embed.num_patches, model.num_features)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)


def test_registered_model_forward_intermediates():
    model = timm.create_model("muse_vit_tiny_patch4_32", depth=3).eval()
    x = _input(model)
    final, inter = model.forward_intermediates(x, indices=[0, 2])
    assert [t.shape for t in inter] == [(2, 192, 8, 8)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    assert len(model.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


@pytest.mark.parametrize("size", [(28, 44), (40, 24)])
def test_registered_model_dynamic_img_size_follows_non_square_grids(size):
    model = timm.create_model("muse_vit_tiny_patch4_28", depth=2, dynamic_img_size=True, reg_tokens=2).eval()
    x = _input(model, size=size)
    grids = []
    for b in model.blocks:  # test probe: the grid each convolution is given
        b.attn.conv.register_forward_pre_hook(
            lambda m, args, kw: grids.append(tuple(kw["grid_size"])), with_kwargs=True)
    out = model(x)
    grid = (size[0] // 4, size[1] // 4)
    assert out.shape == (2, 10) and grids == [grid] * len(model.blocks)
    assert all(b.attn.grid_size == (7, 7) for b in model.blocks)  # the call's grid was told for that call alone
    # The grid matters: the same tokens read as the transposed grid give other outputs.
    block = model.blocks[0]
    assert model.num_prefix_tokens == 2
    tokens = torch.randn(2, 2 + grid[0] * grid[1], 192)
    assert not torch.allclose(block(tokens, grid_size=grid), block(tokens, grid_size=grid[::-1]))


def test_registered_model_grad_checkpointing_matches():
    model = timm.create_model("muse_vit_tiny_patch4_28", depth=2)
    x = _input(model)
    ref = model(x)
    ref.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(x)
    out.sum().backward()
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4)


def test_registered_model_loads_weights_from_a_local_file(tmp_path):
    source = timm.create_model("muse_vit_tiny_patch4_32", depth=2).eval()
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    loaded = timm.create_model(
        "muse_vit_tiny_patch4_32", depth=2, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    x = _input(source)
    torch.testing.assert_close(loaded(x), source(x))


def test_registered_model_deepcopy_computes_the_same_function_at_any_grid():
    model = timm.create_model("muse_vit_tiny_patch4_28", depth=1, dynamic_img_size=True).eval()
    ema = copy.deepcopy(model)
    for size in [(20, 36), (28, 28), (36, 20)]:
        x = _input(model, size=size)
        torch.testing.assert_close(ema(x), model(x))
    assert ema.blocks[0].attn.grid_size == model.blocks[0].attn.grid_size == (7, 7)  # no call left its grid


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("muse_vit_gigantic_patch16_224")


def test_registered_model_features_only():
    model = timm.create_model("muse_vit_tiny_patch4_32", depth=3, features_only=True, out_indices=(1, 2)).eval()
    feats = model(torch.randn(2, 3, 32, 32))
    assert [f.shape for f in feats] == [(2, 192, 8, 8)] * 2


def test_registered_model_compiles_without_graph_breaks_and_follows_the_grid():
    torch._dynamo.reset()
    model = timm.create_model("muse_vit_tiny_patch4_28", depth=1, dynamic_img_size=True).eval()
    compiled = torch.compile(model, fullgraph=True)
    for size in [(28, 28), (28, 36)]:
        x = _input(model, size=size)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        assert model.blocks[0].attn.grid_size == (7, 7)  # the call's grid was told for that call alone


@pytest.mark.parametrize("name", SMALL)
def test_registered_model_honours_device_and_dtype(name):
    assert {p.device.type for p in timm.create_model(name, depth=1, device="meta").parameters()} == {"meta"}
    model = timm.create_model(name, depth=1, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(_input(model).to(torch.bfloat16)).dtype == torch.bfloat16
