"""swap_attention across timm's attention families: one small model of each, the same function after the swap."""
import copy
import inspect
import warnings
from functools import partial

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block
from timm.models import efficientformer, hiera, hieradet_sam2, levit, metaformer, mvitv2, nest, tiny_vit, volo
from torch import nn
from torch._dynamo.testing import CompileCounter

from muse_lightning import (
    AttentionAdapter, MixerOptions, MUSEBranch, MUSEEva, MUSEVisionTransformer, register_attention_adapter,
    swap_attention,
)
from muse_lightning.adapters import ATTENTION_ADAPTERS, patch_grid
from muse_lightning.branch import CallLayout

_VIT = dict(img_size=32, patch_size=8, depth=2, num_classes=5)
_SMALL = dict(_VIT, embed_dim=64, num_heads=2)
_SWIN = dict(img_size=32, patch_size=2, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=32, num_classes=5)

def _mvit(use_cls_token: bool, **kwargs):
    cfg = mvitv2.MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=(16, 32, 64, 128), num_heads=(1, 2, 4, 8),
                                  use_cls_token=use_cls_token)
    return mvitv2.MultiScaleVit(cfg, img_size=64, num_classes=5, **kwargs)


# (model, kwargs, swapped, layouts (layout, prefix tokens, grid), what is left alone). Images are 32 x 32 unless
# img_size says otherwise.
ZOO = [
    ("vit_tiny_patch16_224", dict(_VIT, reg_tokens=2), 2, {("2d", 3, (4, 4))}, []),
    ("deit_tiny_distilled_patch16_224", _VIT, 2, {("2d", 2, (4, 4))}, []),
    ("vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2, num_classes=5), 2, {("2d", 1, (2, 2))}, []),
    ("vit_base_patch16_xp_224", _SMALL, 2, {("2d", 1, (4, 4))}, []),
    ("vit_dwee_patch16_reg1_gap_256", _SMALL, 2, {("2d", 1, (4, 4))}, []),
    ("qwen3_vit_88m", dict(depth=2, embed_dim=64, num_heads=2, img_size=64, num_classes=5), 2, {("2d", 0, (4, 4))}, []),
    ("vitamin_small_224", dict(img_size=64, num_classes=5), 14, {("2d", 0, (4, 4))}, []),
    ("naflexvit_base_patch16_gap", _SMALL, 2, {("2d", 4, None)}, []),
    ("pit_ti_distilled_224", dict(img_size=64, num_classes=5), 12, {("2d", 2, None)}, []),
    ("crossvit_9_240", dict(num_classes=5, input_size=240), 12, {("2d", 1, None)},
     [f"blocks.{i}.fusion.{j}.attn" for i in range(3) for j in range(2)]),
    ("mobilevit_xxs", dict(num_classes=5, input_size=64), 9, {("1d", 0, None)}, []),
    ("csatv2", dict(num_classes=5, input_size=64), 4, {("1d", 0, None)}, []),
    ("eva02_tiny_patch14_224", _VIT, 2, {("2d", 1, (4, 4))}, []),
    ("vit_base_patch16_rope_224", _SMALL, 2, {("2d", 1, (4, 4))}, []),
    ("vit_small_patch16_dinov3", _SMALL, 2, {("2d", 5, (4, 4))}, []),
    ("vit_pe_core_small_patch16_384", _SMALL, 2, {("2d", 1, (4, 4))}, ["attn_pool"]),
    ("beit_base_patch16_224", _SMALL, 2, {("2d", 1, (4, 4))}, []),
    ("beitv2_base_patch16_224", _SMALL, 2, {("2d", 1, (4, 4))}, []),
    ("vit_relpos_base_patch16_224", _SMALL, 2, {("2d", 0, (4, 4))}, []),
    ("samvit_base_patch16", dict(_SMALL, img_size=64, window_size=4, global_attn_indexes=(1,)), 2,
     {("2d", 0, (4, 4)), ("2d", 0, (8, 8))}, []),
    ("cait_xxs24_224", dict(_SMALL, depth_token_only=1), 2, {("2d", 0, (4, 4))}, ["blocks_token_only.0.attn"]),
    ("swin_tiny_patch4_window7_224", _SWIN, 2, {("2d", 0, (4, 4))}, []),
    ("swinv2_tiny_window8_256", _SWIN, 2, {("2d", 0, (4, 4))}, []),
    ("deepseek_vit_412m", _SMALL, 2, {("2d", 0, (4, 4))}, []),
    ("swinv2_cr_tiny_224", dict(_SWIN, patch_size=4), 2, {("2d", 0, (4, 4))}, []),
    ("davit_tiny", dict(depths=(1, 1), embed_dims=(32, 64), num_heads=(2, 4), num_classes=5, input_size=64), 2,
     {("2d", 0, (7, 7))}, ["stages.0.blocks.0.1.attn", "stages.1.blocks.0.1.attn"]),
    ("tiny_vit", dict(build=tiny_vit.TinyVit, embed_dims=(16, 32, 32, 32), depths=(1, 1, 1, 1),
                      num_heads=(1, 2, 2, 2), window_sizes=(2, 2, 2, 2), num_classes=5, input_size=64),
     3, {("2d", 0, (2, 2))}, []),
    ("maxvit_tiny_tf_224", dict(img_size=64, depths=(1, 1), embed_dim=(32, 64), stem_width=16, num_classes=5), 4,
     {("2d", 0, None)}, []),
    ("caformer", dict(build=metaformer.MetaFormer, depths=(1, 1, 1, 1), dims=(16, 32, 32, 32),
                      token_mixers=[metaformer.SepConv] * 2 + [metaformer.Attention] * 2,
                      norm_layers=[metaformer.LayerNorm2dNoBias] * 2 + [metaformer.LayerNormNoBias] * 2,
                      num_classes=5, input_size=64), 2, {("2d", 0, None)}, []),
    ("efficientformer", dict(build=efficientformer.EfficientFormer, depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64),
                             num_vit=1, num_classes=5, input_size=224), 1, {("2d", 0, None)}, []),
    ("fastvit_sa12", dict(num_classes=5, input_size=64), 2, {("2d", 0, None)}, []),
    ("nest", dict(build=nest.Nest, img_size=32, patch_size=2, num_levels=2, embed_dims=(32, 64), num_heads=(2, 4),
                  depths=(1, 1), num_classes=5), 2, {("2d", 0, None)}, []),
    ("convit_tiny", dict(_SMALL, depth=3, local_up_to_layer=2, num_heads=4), 3,
     {("2d", 0, (4, 4)), ("2d", 1, (4, 4))}, []),
    ("coatnet_pico_rw_224", dict(num_classes=5, img_size=64), 7, {("2d", 0, None)}, []),
    ("visformer_tiny", dict(num_classes=5, input_size=224), 8, {("2d", 0, None)}, []),
    ("gcvit_xxtiny", dict(num_classes=5, img_size=64), 12, {("2d", 0, (2, 2)), ("2d", 0, (4, 4))}, []),
    ("tnt_s_patch16_224", dict(num_classes=5, img_size=32, depth=2), 4, {("2d", 0, (4, 4)), ("2d", 1, (2, 2))}, []),
    ("pvt_v2_b0", dict(num_classes=5, input_size=64), 8, {("2d", 0, None)}, []),
    ("twins_pcpvt_small", dict(num_classes=5, depths=(1, 1, 1, 1), input_size=64), 4, {("2d", 0, None)}, []),
    ("mvitv2", dict(build=partial(_mvit, False), input_size=64), 4, {("2d", 0, None)}, []),
    ("mvitv2_cls", dict(build=partial(_mvit, True), input_size=64), 4, {("2d", 1, None)}, []),
    ("volo", dict(build=volo.VOLO, layers=(1, 1, 1, 1), img_size=64, embed_dims=(32, 64, 64, 64),
                  num_heads=(1, 2, 2, 2), num_classes=5), 4, {("2d", 0, None)}, ["post_network.0.attn"]),
    ("twins_svt_small", dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 64, 64), num_heads=(1, 2, 2, 2),
                             wss=(4, 4, 2, 2), num_classes=5, input_size=64), 4, {("2d", 0, None)}, []),
    ("levit_128s", dict(img_size=128, num_classes=5), 11,
     {("2d", 0, (8, 8)), ("2d", 0, (4, 4)), ("2d", 0, (2, 2))}, []),
    ("levit_conv_128s", dict(img_size=64, num_classes=5), 11, {("2d", 0, None)}, []),
    ("efficientformerv2_s0", dict(img_size=64, num_classes=5), 5, {("2d", 0, None)}, []),
    ("coat_lite_tiny", dict(img_size=64, num_classes=5), 8, {("2d", 1, None)}, []),
    ("coat_tiny", dict(img_size=64, num_classes=5), 26, {("2d", 1, None)}, []),
    ("nextvit_small", dict(depths=(1, 1, 5, 1), num_classes=5, input_size=64), 3, {("2d", 0, None), ("1d", 0, None)},
     []),
    ("efficientvit_m0", dict(img_size=64, num_classes=5), 6, {("2d", 0, None)}, []),
    ("mobilenetv4_hybrid_medium", dict(num_classes=5, input_size=64), 8, {("2d", 0, None)}, []),
    ("mobilenetv5_base", dict(channel_multiplier=0.25, num_classes=5, input_size=64), 13, {("2d", 0, None)}, []),
    ("shvit_s1", dict(num_classes=5, input_size=64), 9, {("2d", 0, None)}, []),
    ("iformer_m", dict(num_classes=5, input_size=64), 6, {("2d", 0, None)}, []),
    ("lowformer_b0", dict(num_classes=5, input_size=64), 7, {("2d", 0, None)}, []),
    ("cpubone_b0_bfrobust", dict(num_classes=5, input_size=64), 7, {("2d", 0, None)}, []),
    ("gemma4_vit_167m", dict(depth=2, embed_dim=64, num_heads=2, head_dim=32, num_classes=5, input_size=48), 2,
     {("1d", 0, None)}, []),
    ("botnet26t_256", dict(img_size=128, num_classes=5), 3, {("2d", 0, None)}, []),
    ("halonet26t", dict(img_size=256, num_classes=5), 3, {("2d", 0, None)}, []),
    ("resnet18_non_local", dict(build=partial(timm.create_model, "resnet18", block_args=dict(attn_layer="nl")),
                                num_classes=5, input_size=64), 8, {("2d", 0, None)}, []),
    ("hiera", dict(build=hiera.Hiera, img_size=(64, 64), embed_dim=16, num_heads=1, stages=(1, 1, 1, 1),
                   num_classes=5, input_size=64), 4, {("2d", 0, None)}, []),
    ("sam2_hiera", dict(build=hieradet_sam2.HieraDet, embed_dim=16, num_heads=1, stages=(1, 2, 2, 1),
                        global_att_blocks=(2, 4), window_spec=(4, 4, 4, 2), num_classes=5, input_size=64), 6,
     {("2d", 0, None)}, []),
]
ZOO_IDS = [entry[0] for entry in ZOO]
_ZOO_KWARGS = {entry[0]: entry[1] for entry in ZOO}
# Models whose features are their class tokens only: the last block's convolution, which neither reads nor
# writes them, reaches no output (the class-token caveat of docs/timm.md).
CLASS_TOKEN_FEATURES = {"pit_ti_distilled_224": "transformers.2.blocks.3.attn.muse."}
# timm 1.0.31's models without activation checkpointing (their set_grad_checkpointing asserts).
NO_CHECKPOINTING = {
    "pit_ti_distilled_224", "crossvit_9_240", "convit_tiny", "twins_pcpvt_small", "twins_svt_small", "coat_lite_tiny",
    "coat_tiny",
}
# timm 1.0.31's own models that torch.fx cannot trace (Hiera's optional mask, Gemma4's input dispatch), and how.
FX_UNTRACEABLE = {"hiera": AttributeError, "gemma4_vit_167m": torch.fx.proxy.TraceError}


def _build(name, kwargs):
    torch.manual_seed(0)
    kwargs = dict(kwargs)
    size = kwargs.pop("input_size", kwargs.get("img_size", 32))
    build = kwargs.pop("build", None)
    model = build(**kwargs) if build else timm.create_model(name, pretrained=False, **kwargs)
    return model.eval(), torch.randn(2, 3, size, size)


def _swap(model, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, names = swap_attention(model, MixerOptions(**options), return_names=True)
    return model, names, [str(w.message) for w in caught if "swap_attention left" in str(w.message)]


def _branches(model):
    return [m for m in model.modules() if isinstance(m, MUSEBranch)]


@pytest.mark.parametrize(("name", "kwargs", "count", "layouts", "left"), ZOO, ids=ZOO_IDS)
def test_swapped_family_computes_the_same_function_over_its_own_layout(name, kwargs, count, layouts, left):
    model, x = _build(name, kwargs)
    ref = model(x)
    keys = set(model.state_dict())
    model, names, messages = _swap(model)
    assert len(names) == count and len(_branches(model)) == count
    assert {(b.conv_layout, b.num_prefix_tokens, b.grid_size) for b in _branches(model)} == layouts
    assert (model(x) - ref).abs().max() <= 1e-4
    assert keys <= set(model.state_dict())  # the attention's own weights keep their keys
    if left:
        assert len(messages) == 1 and all(f"{n} (" in messages[0] for n in left)
    else:
        assert not messages


@pytest.mark.parametrize(("name", "kwargs", "count", "layouts", "left"), ZOO, ids=ZOO_IDS)
def test_swapped_family_takes_every_input_its_original_takes(name, kwargs, count, layouts, left):
    """A second, wider-than-tall image: where the original runs on it, the swapped model computes the same function,
    its 2-D convolutions on grids no taller than wide (never a transposed or guessed grid); where the original
    refuses it (a fixed patch grid, windows that must tile), the swapped model refuses it too. Where the model
    takes an attention mask, the same function under a mask blocking the last keys."""
    model, x = _build(name, kwargs)
    wide = torch.randn(2, 3, x.shape[-2], x.shape[-1] * 3 // 2)
    try:
        wide_ref, refused = model(wide), None
    except Exception as error:  # the original's own limit
        wide_ref, refused = None, type(error)
    mask = None
    if "attn_mask" in inspect.signature(model.forward_features).parameters:
        n = model.forward_features(x).shape[1]
        mask = torch.ones(1, 1, n, n, dtype=torch.bool)
        mask[..., -3:] = False  # the last three keys, blocked for every query
        masked_ref = model.forward_features(x, attn_mask=mask)
    model, _, _ = _swap(model)
    if mask is not None:
        assert (model.forward_features(x, attn_mask=mask) - masked_ref).abs().max() <= 1e-4
    if refused is not None:
        with pytest.raises(refused):
            model(wide)
        return
    grids = []
    for branch in _branches(model):
        if branch.conv_layout == "2d":
            branch.conv.register_forward_pre_hook(  # test probe: the grid each convolution is given
                lambda m, args, kw: grids.append(tuple(kw["grid_size"])), with_kwargs=True)
    assert (model(wide) - wide_ref).abs().max() <= 1e-4
    assert all(h <= w for h, w in grids)


def _features(model, x):
    """The model's features (CrossViT: each branch's tokens, joined)."""
    features = model.forward_features(x)
    if isinstance(features, (list, tuple)):
        return torch.cat([f.flatten(1) for f in features], dim=1)
    return features


@pytest.mark.parametrize(("name", "kwargs", "count", "layouts", "left"), ZOO, ids=ZOO_IDS)
def test_swapped_family_trains_every_branch_parameter(name, kwargs, count, layouts, left):
    model, x = _build(name, kwargs)
    model, _, _ = _swap(model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = torch.randn_like(_features(model, x))
    reached = {n: False for n, _ in model.named_parameters() if ".muse." in n}
    # On the features, not a class-token head (through which the last block's convolution gets no gradient).
    # The projection leaves zero first, then the kernels get a gradient (a step or two later where the
    # model zero-initialises what follows the attention: Swin v2's post-norms, NesT).
    for _ in range(4):
        opt.zero_grad()
        loss = F.mse_loss(_features(model, x), target)
        loss.backward()
        assert torch.isfinite(loss)
        for n, p in model.named_parameters():
            if n in reached and p.grad is not None and p.grad.abs().sum() > 0:
                reached[n] = True
        opt.step()
    dead = CLASS_TOKEN_FEATURES.get(name)
    assert [n for n, ok in reached.items() if not ok] == [n for n in reached if dead and n.startswith(dead)]


def _random_branch(branch):
    with torch.no_grad():
        for p in branch.parameters():
            p.normal_()
    return branch


def _branch_out(branch, values, grid):
    """The convolution branch alone, on ``values (B, N, C)``; a feature-map branch gets them as ``(B, H, W, C)``."""
    if branch.feature_map:
        values = values.unflatten(1, grid)
    for part, part_values in enumerate(values.chunk(len(branch._values), dim=-1)):  # one per value layer
        branch.stash(part_values, part)
    width = branch.conv_proj.out_features
    out = branch(torch.zeros_like(values), lambda t: t.new_zeros(*t.shape[:-1], width))
    return out.flatten(1, 2) if branch.feature_map else out


@pytest.mark.parametrize(("name", "kwargs", "count", "layouts", "left"), ZOO, ids=ZOO_IDS)
def test_swapped_branch_skips_prefix_tokens_and_reads_only_grid_neighbours(name, kwargs, count, layouts, left):
    model, _ = _build(name, kwargs)
    model, _, _ = _swap(model)
    for branch in _branches(model):
        _random_branch(branch)
        branch.values_at = None  # the convolution in row-major order (Hiera's token order: its own test)
        # A map's grid is its shape; with no grid of its own, a square one is inferred.
        prefix, (h, w) = branch.num_prefix_tokens, branch.grid_size or ((5, 6) if branch.feature_map else (5, 5))
        values = torch.randn(2, prefix + h * w, branch.conv.weight[0].shape[0])
        base = _branch_out(branch, values, (h, w))
        if prefix:
            moved = values.clone()
            moved[:, :prefix] += 1.0
            torch.testing.assert_close(_branch_out(branch, moved, (h, w)), base)
            assert base[:, :prefix].abs().max() == 0
        r, c = h // 2, w // 2
        moved = values.clone()
        moved[:, prefix + r * w + c] += 1.0
        changed = (_branch_out(branch, moved, (h, w)) - base)[0, prefix:].abs().sum(-1).view(h, w) > 0
        reach = max(branch.kernel_sizes) // 2
        rows, cols = torch.arange(h)[:, None], torch.arange(w)[None, :]
        assert not (changed & (((rows - r).abs() > reach) | ((cols - c).abs() > reach))).any()
        assert changed[r, c]


@pytest.mark.parametrize(("name", "kwargs", "count", "layouts", "left"), ZOO, ids=ZOO_IDS)
def test_swapped_family_traces_with_fx(name, kwargs, count, layouts, left):
    from timm.models._features_fx import create_feature_extractor, get_graph_node_names
    model, x = _build(name, kwargs)
    if name in FX_UNTRACEABLE:  # timm's own model does not trace: nothing for the swap to keep
        with pytest.raises(FX_UNTRACEABLE[name]):
            create_feature_extractor(model, {get_graph_node_names(model)[1][-1]: "out"})(x)
        return
    model, _, _ = _swap(model)
    for branch in _branches(model):
        _random_branch(branch)  # a trained branch, so that a graph that dropped it would differ
    output = get_graph_node_names(model)[1][-1]
    torch.testing.assert_close(create_feature_extractor(model, {output: "out"})(x)["out"], model(x))


def _fx_features(model, node):
    from timm.models._features_fx import create_feature_extractor
    return create_feature_extractor(model, {node: "out"})


@pytest.mark.parametrize(("name", "kwargs", "node"), [
    ("muse_vit_tiny_patch4_32", dict(depth=2), "norm"),
    ("vit_tiny_patch16_224", _VIT, "norm"),
    ("eva02_tiny_patch14_224", _VIT, "norm"),
    ("swin_tiny_patch4_window7_224", _SWIN, "norm"),
    ("maxvit_tiny_tf_224", dict(img_size=64, depths=(1, 1), embed_dim=(32, 64), stem_width=16), "norm"),
])
def test_registered_and_swapped_models_trace_with_fx_and_compile_fullgraph(name, kwargs, node):
    model, x = _build(name, kwargs)
    if not name.startswith("muse_"):
        model, _, _ = _swap(model)
        for branch in _branches(model):
            _random_branch(branch)  # a trained branch, so that a graph that dropped it would differ
    features = model.forward_features(x)
    torch.testing.assert_close(_fx_features(model, node)(x)["out"], features)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_swapped_dynamic_size_model_compiles_no_more_graphs_than_timms(name):
    """Over a run of image sizes, torch.compile (fullgraph) builds no more graphs for the swapped model than for
    timm's own: each call's layout adds no guard of its own."""

    def graphs(model: nn.Module) -> int:
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        for h, w in [(32, 32), (32, 48), (48, 32), (40, 56), (24, 24)]:
            compiled(torch.randn(2, 3, h, w))
        return counter.frame_count

    model, _ = _build(name, dict(_VIT, dynamic_img_size=True))
    ref = graphs(model)
    swapped, _, _ = _swap(copy.deepcopy(model))
    assert graphs(swapped) <= ref


def test_hiera_token_order_and_pooled_grids_compile_fullgraph():
    model, x = _build("hiera", _ZOO_KWARGS["hiera"])
    model, _, _ = _swap(model)
    for branch in _branches(model):
        with torch.no_grad():
            for p in branch.parameters():
                p.normal_(0, 0.05)  # a trained branch, so that a graph that dropped it would differ
    features = model.forward_features  # Hiera's head starts at zero: its features show the branches
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(features, fullgraph=True)(x), features(x), atol=1e-5, rtol=1e-4)


def test_registered_model_fx_features_only_and_torchvision_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor
    model = timm.create_model(
        "muse_vit_tiny_patch4_32", depth=2, features_only=True, feature_cls="fx", out_indices=(0, 1),
    )
    feats = model(torch.randn(2, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(2, 64, 192)] * 2
    vit = swap_attention(timm.create_model("vit_tiny_patch16_224", **_VIT)).eval()
    x = torch.randn(2, 3, 32, 32)
    out = create_feature_extractor(vit, {"blocks.1": "last"})(x)["last"]
    torch.testing.assert_close(vit.norm(out), vit.forward_features(x))


def test_torchscript_fails_at_once_saying_why():
    for model in (timm.create_model("muse_vit_tiny_patch4_32", depth=1),
                  swap_attention(timm.create_model("vit_tiny_patch16_224", **_VIT))):
        with pytest.raises(NotImplementedError, match="MUSE does not support torch.jit.script"):
            torch.jit.script(model)


@pytest.mark.parametrize("name", ["muse_vit_tiny_patch4_32", "vit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_patch_dropout_convolves_kept_patches_at_their_real_places(name):
    kwargs = dict(depth=1) if name.startswith("muse_") else dict(_VIT, depth=1)
    model = timm.create_model(name, patch_drop_rate=0.5, **kwargs)
    if not name.startswith("muse_"):
        model = swap_attention(model)
        _random_branch(_branches(model)[0])
    assert isinstance(model, (MUSEVisionTransformer, MUSEEva))
    mixer = next(m for m in model.modules() if hasattr(m, "patch_indices"))
    seen = {}
    mixer.register_forward_pre_hook(lambda m, args: seen.update(grid=m.grid_size, places=m.patch_indices))  # probe
    model.train()
    torch.manual_seed(1)
    out = model(torch.randn(2, 3, 32, 32))
    assert torch.isfinite(out).all() and seen["places"] is not None
    assert mixer.patch_indices is None  # told for that call alone
    kept = seen["places"].shape[-1]
    grid = seen["grid"]
    assert kept == max(1, int(grid[0] * grid[1] * 0.5))
    # Against the reference: scatter the kept values into the grid (dropped = 0), convolve, gather.
    indices = mixer.patch_indices = seen["places"]
    values = torch.randn(2, mixer.num_prefix_tokens + kept, mixer.conv.weight[0].shape[0])
    full = torch.zeros(2, grid[0] * grid[1], values.shape[-1]).scatter(
        1, indices[..., None].expand(-1, -1, values.shape[-1]), values[:, mixer.num_prefix_tokens:])
    ref = mixer.conv(full, grid_size=grid).gather(1, indices[..., None].expand(-1, -1, values.shape[-1]))
    got = mixer._mix_conv(torch.zeros(2, values.shape[1], values.shape[-1]), values, lambda t: t * 0.0, None,
                          {"grid_size": grid})
    proj = mixer.conv_proj
    torch.testing.assert_close(got[:, mixer.num_prefix_tokens:], proj(ref))
    mixer.patch_indices = None
    model.eval()
    model(torch.randn(2, 3, 32, 32))
    assert seen["places"] is None  # no dropout in eval: the whole grid again


@pytest.mark.parametrize("name", ["muse_vit_tiny_patch4_28", "vit_tiny_patch16_224", "eva02_tiny_patch14_224"])
def test_dynamic_size_checkpointing_recomputes_with_each_calls_own_grid(name):
    """Two forwards of different grids, then both backwards: recompute must use each call's grid."""
    def grads(checkpointing):
        torch.manual_seed(0)
        if name.startswith("muse_"):
            model, chans, patch = timm.create_model(name, depth=2, dynamic_img_size=True), 1, 4
        else:
            model, chans, patch = _build(name, dict(_VIT, dynamic_img_size=True))[0], 3, 8
            for branch in _branches(swap_attention(model)):
                _random_branch(branch)
        model.train().set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)
        a = model(torch.randn(2, chans, 7 * patch, 9 * patch))
        b = model(torch.randn(2, chans, 9 * patch, 5 * patch))
        (a.sum() + 2 * b.sum()).backward()
        return {n: p.grad for n, p in model.named_parameters()}
    ref, ckpt = grads(False), grads(True)
    for n in ref:
        torch.testing.assert_close(ckpt[n], ref[n], atol=1e-5, rtol=1e-4)


SWAP_OPTIONS = [{}, {"conv_layout": "1d"}, {"conv_proj": "shared"}, {"conv_proj": "per_kernel"},
                {"conv_type": "dynamic", "conv_layout": "1d"}]


@pytest.mark.parametrize("options", SWAP_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize(("name", "kwargs"), [
    ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    ("vit_tiny_patch16_224", {"dynamic_img_size": True, "class_token": False, "global_pool": "avg"}),
    ("eva02_tiny_patch14_224", {}),
    ("eva02_tiny_patch14_224", {"dynamic_img_size": True}),
])
def test_swap_options_keep_the_function(name, kwargs, options):
    model, x = _build(name, dict(_VIT, **kwargs))
    if kwargs.get("dynamic_img_size"):
        x = torch.randn(2, 3, 32, 40)  # a 4 x 5 grid
    ref = model(x)
    model, names, _ = _swap(model, **options)
    assert names == [f"blocks.{i}.attn" for i in range(2)]
    assert (model(x) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize(("name", "cls"), [("vit_tiny_patch16_224", "MUSEVisionTransformer"),
                                           ("eva02_tiny_patch14_224", "MUSEEva"),
                                           ("naflexvit_base_patch16_gap", "MUSENaFlexVit")])
def test_swapped_dynamic_size_model_follows_non_square_grids(name, cls):
    kwargs = _SMALL if name.startswith("naflex") else dict(_VIT, dynamic_img_size=True)  # NaFlexViT: any size
    model, _ = _build(name, kwargs)
    model, _, _ = _swap(model)
    assert type(model).__name__ == cls
    branch = _branches(model)[0]
    _random_branch(branch)
    grids = []
    branch.register_forward_pre_hook(lambda m, args: grids.append(m.grid_size))  # test probe: each call's grid
    model(torch.randn(1, 3, 32, 40))
    model(torch.randn(1, 3, 48, 24))
    assert grids == [(4, 5), (6, 3)]


@pytest.mark.parametrize(("name", "kwargs", "new"), [
    ("vit_tiny_patch16_224", _VIT, dict(img_size=48)),
    ("eva02_tiny_patch14_224", _VIT, dict(img_size=48)),
    ("beit_base_patch16_224", _SMALL, dict(img_size=48)),
    ("vit_relpos_base_patch16_224", _SMALL, dict(img_size=48)),
    ("swin_tiny_patch4_window7_224", dict(_SWIN, patch_size=4), dict(img_size=48, window_size=6)),
    ("muse_vit_tiny_patch4_32", dict(depth=2, patch_size=8), dict(img_size=48)),
])
def test_set_input_size_moves_the_convolution_to_the_new_grid(name, kwargs, new):
    model, _ = _build(name, kwargs)
    if not name.startswith("muse_"):
        model, _, _ = _swap(model)
    model.set_input_size(**new)
    mixers = [m for m in model.modules() if hasattr(m, "conv") and hasattr(m, "grid_size")]
    assert {m.grid_size for m in mixers} == {(6, 6)}  # 48 px: 6 x 6 patches of 8 (Swin: its new 6 x 6 windows)
    assert torch.isfinite(model(torch.randn(1, 3, 48, 48))).all()


def test_sam_branch_follows_any_image_size():
    model, _ = _build("samvit_base_patch16", _ZOO_KWARGS["samvit_base_patch16"])
    model, _, _ = _swap(model)
    branch = _random_branch(model.blocks[1].attn.muse)  # the global block: the whole image's grid
    seen = {}
    branch.register_forward_pre_hook(lambda m, args: seen.update(call=m._call))  # test probe
    model(torch.randn(1, 3, 64, 80))
    assert (seen["call"].values_grid, seen["call"].output_grid) == ((8, 10), (8, 10))


def test_swapped_model_fine_tunes_from_the_original():
    model, _ = _build("vit_tiny_patch16_224", _VIT)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 5, (16,))
    start = F.cross_entropy(model(x), y).item()
    swap_attention(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - start) < 1e-4  # fine-tuning starts from the original model
    assert losses[-1] < 0.5 * losses[0]
    branch = model.blocks[0].attn.muse
    assert branch.conv_proj.weight.abs().sum() > 0 and all(w.grad.abs().sum() > 0 for w in branch.conv.weight)


@pytest.mark.parametrize("wrap", ["module", "features_only"])
def test_swap_finds_the_patch_grid_inside_a_users_module_or_a_features_wrapper(wrap):
    if wrap == "module":
        model = nn.Sequential(timm.create_model("vit_tiny_patch16_224", **_VIT), nn.Identity())
    else:
        model = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1,), **_VIT)
    model, _, _ = _swap(model)
    assert {(b.conv_layout, b.num_prefix_tokens, b.grid_size) for b in _branches(model)} == {("2d", 1, (4, 4))}


class _UserAttention(nn.Module):
    """A user's own attention: separate projections, an output layer of its own name."""

    def __init__(self, dim: int = 32, num_heads: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v_proj, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = (t.view(B, N, self.num_heads, -1).transpose(1, 2) for t in (self.q(x), self.k(x), self.v_proj(x)))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


def test_users_register_an_adapter_for_their_own_attention(monkeypatch):
    monkeypatch.setitem(ATTENTION_ADAPTERS, _UserAttention, AttentionAdapter(patch_grid, output="out"))
    model = nn.Sequential(_UserAttention(), _UserAttention()).eval()
    x = torch.randn(2, 9, 32)
    ref = model(x)
    with pytest.raises(ValueError, match="no attention module that swap_attention has an adapter for"):
        swap_attention(nn.Sequential(nn.Linear(4, 4)))
    swap_attention(model)
    assert all(m.muse.conv_layout == "1d" for m in model)  # no patch grid around it: a sequence
    assert (model(x) - ref).abs().max() <= 1e-6
    _random_branch(model[0].muse)
    assert (model(x) - ref).abs().max() > 1e-3
    with pytest.raises(TypeError, match="must be an AttentionAdapter"):
        register_attention_adapter(_UserAttention, object())


def test_attention_left_alone_is_a_warning_and_with_strict_an_error():
    model, _ = _build("vit_pe_core_small_patch16_384", _SMALL)
    with pytest.raises(ValueError, match=r"attn_pool \(AttentionPoolLatent: a pooling head.*strict=True"):
        swap_attention(model, strict=True)
    with pytest.warns(UserWarning, match=r"left 1 attention modules without MUSE: attn_pool"):
        swap_attention(model)


def test_an_attention_without_adapter_is_named():
    class OddAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Linear(4, 4)

    model = nn.Sequential(Block(32, 4), OddAttention())
    with pytest.warns(UserWarning, match=r"1 \(OddAttention: no adapter; see register_attention_adapter\)"):
        swap_attention(model)


def test_follows_layout_registers_each_timm_model_class_once_and_only_timms():
    from timm.models.vision_transformer import VisionTransformer

    from muse_lightning.vit import _FOLLOWING, follows_layout

    assert _FOLLOWING[VisionTransformer] is MUSEVisionTransformer
    with pytest.raises(TypeError, match="last base must be a timm model class not yet followed"):
        follows_layout(type("Again", (MUSEVisionTransformer, VisionTransformer), {}))
    with pytest.raises(TypeError, match="last base must be a timm model class"):
        follows_layout(type("Mine", (nn.Module,), {}))
    assert _FOLLOWING[VisionTransformer] is MUSEVisionTransformer


def test_swap_errors_are_clear():
    vit = lambda: _build("vit_tiny_patch16_224", _VIT)[0]  # noqa: E731
    with pytest.raises(ValueError, match="has no attention module that swap_attention has an adapter for"):
        swap_attention(timm.create_model("resnet10t"))
    with pytest.raises(TypeError, match=r"unknown mixer options \['num_heads'\]; the options are"):
        swap_attention(vit(), {"num_heads": 4})  # the attention's own: taken from the model
    with pytest.raises(ValueError, match="conv_type='none' would swap attention for attention"):
        swap_attention(vit(), MixerOptions(conv_type="none"))
    with pytest.raises(ValueError, match="cannot start silent"):
        swap_attention(vit(), MixerOptions(conv_type="dynamic", conv_proj="shared", conv_layout="1d"))
    untouched = vit()
    with pytest.raises(ValueError, match="needs conv_type='static'"):
        swap_attention(untouched, MixerOptions(conv_type="dynamic"))
    assert not _branches(untouched) and type(untouched.blocks[0].attn.qkv) is nn.Linear  # nothing half-swapped
    with pytest.raises(ValueError, match=r"conv_layout='2d' needs a token grid, but 0.attn \(Attention\)"):
        swap_attention(nn.Sequential(Block(32, 4)), MixerOptions(conv_layout="2d"))
    twice = swap_attention(vit())
    with pytest.raises(ValueError, match="blocks.0.attn already has a MUSE branch"):
        swap_attention(twice)


def test_swap_into_a_plain_block_stack_uses_the_1d_layout():
    blocks = nn.Sequential(Block(32, 4, qkv_bias=True), Block(32, 4, qkv_bias=True)).eval()
    x = torch.randn(2, 9, 32)
    ref = blocks(x)
    swap_attention(blocks)
    assert isinstance(blocks[0].attn, Attention) and blocks[0].attn.muse.conv_layout == "1d"
    torch.testing.assert_close(blocks(x), ref, atol=1e-5, rtol=1e-5)


def test_swapped_model_deep_copies_and_reloads_its_branches(tmp_path):
    model, x = _build("eva02_tiny_patch14_224", _VIT)
    model, _, _ = _swap(model)
    for branch in _branches(model):
        _random_branch(branch)
    ema = copy.deepcopy(model)  # EMA: the copy's taps feed the copy's branches
    tap = ema.blocks[0].attn.qkv
    assert tap.__dict__["muse_branch"] is ema.blocks[0].attn.muse is not model.blocks[0].attn.muse
    torch.testing.assert_close(ema(x), model(x))
    torch.save(model, tmp_path / "whole.pth")  # the whole module pickles, taps included
    torch.testing.assert_close(torch.load(tmp_path / "whole.pth", weights_only=False)(x), model(x))
    fresh, _ = _build("eva02_tiny_patch14_224", _VIT)
    fresh, _, _ = _swap(fresh)
    torch.save(model.state_dict(), tmp_path / "swapped.pth")
    fresh.load_state_dict(torch.load(tmp_path / "swapped.pth", weights_only=True))
    torch.testing.assert_close(fresh(x), model(x))


def _naflex_batch(model, valid, seed):
    """NaFlex dict input: sample 0 a full 4 x 4 grid, sample 1 a 2 x 3 grid and padding (random patches)."""
    patches = torch.randn(2, 16, 8 * 8 * 3, generator=torch.Generator().manual_seed(seed))  # 8 x 8 RGB patches
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).view(16, 2)
    coord = torch.stack([coords, torch.cat([torch.stack(torch.meshgrid(
        torch.arange(2), torch.arange(3), indexing="ij"), -1).view(6, 2), torch.zeros(10, 2, dtype=torch.long)])])
    patch_valid = torch.stack([torch.ones(16, dtype=torch.bool), torch.arange(16) < valid])
    return {"patches": patches, "patch_coord": coord, "patch_valid": patch_valid}


def test_naflex_padding_is_never_read_by_the_convolution():
    model, _ = _build("naflexvit_base_patch16_gap", _SMALL)
    model, _, _ = _swap(model)
    for branch in _branches(model):
        _random_branch(branch)  # trained: a branch reading padding would move the valid tokens
    a, b = _naflex_batch(model, 6, 0), _naflex_batch(model, 6, 1)
    b["patches"][:, :6] = a["patches"][:, :6]  # the same valid patches, other padding
    b["patches"][0] = a["patches"][0]
    fa, fb = (model.forward_features(d.pop("patches"), **d)["patches"] for d in (a, b))
    valid = model.num_prefix_tokens + 6
    assert (fa[1, valid:] - fb[1, valid:]).abs().max() > 1e-3  # the padding itself did change
    torch.testing.assert_close(fa[1, :valid], fb[1, :valid])
    torch.testing.assert_close(fa[0], fb[0])


def test_naflex_dict_mode_convolves_each_samples_patches_on_their_own_2d_grid():
    model, _ = _build("naflexvit_base_patch16_gap", _SMALL)
    model, _, _ = _swap(model, kernel_sizes=(3,))  # reach 1: the neighbours below differ from the 1-D ones
    branch = _random_branch(model.blocks[0].attn.muse)
    batch = _naflex_batch(model, 6, 0)  # sample 0: a 4 x 4 grid; sample 1: a 2 x 3 grid, then padding
    seen = {}
    branch.register_forward_pre_hook(lambda m, args: seen.update(grid=m.grid_size, places=m.patch_indices))  # probe
    model(batch)
    (y, x), valid = batch["patch_coord"].unbind(-1), batch["patch_valid"]
    assert seen["grid"] == (5, 4)  # the batch's 4 x 4 grid and one row holding the padding
    torch.testing.assert_close(seen["places"], torch.where(valid, y * 4 + x, 16))
    prefix, width = branch.num_prefix_tokens, branch.conv.weight[0].shape[0]
    values = torch.randn(2, prefix + 16, width)
    padding = torch.zeros(2, prefix + 16, dtype=torch.bool)
    padding[1, prefix + 6:] = True

    def branch_out(v):
        branch.grid_size, branch.patch_indices = seen["grid"], seen["places"]
        branch.see(CallLayout(key_padding=padding))
        return _branch_out(branch, v, None)

    moved = values.clone()
    moved[1, prefix + 3] += 1.0  # sample 1's patch (1, 0)
    changed = (branch_out(moved) - branch_out(values))[1, prefix:prefix + 6].abs().sum(-1) > 0
    # (0, 0), (0, 1), (1, 0), (1, 1) are its 3 x 3 neighbourhood; (0, 2), next to it in the sequence, and (1, 2) not
    assert changed.tolist() == [True, True, False, True, True, False]
    moved = values.clone()
    moved[1, prefix + 6:] += 1.0  # padding, in the cell past the grid
    torch.testing.assert_close(branch_out(moved)[1, :prefix + 6], branch_out(values)[1, :prefix + 6])


def test_naflex_intermediates_follow_the_grid_of_each_input():
    model, _ = _build("naflexvit_base_patch16_gap", _SMALL)
    model, _, _ = _swap(model)
    _random_branch(model.blocks[0].attn.muse)
    image = torch.randn(1, 3, 32, 40)
    final, maps = model.forward_intermediates(image)
    assert [tuple(m.shape) for m in maps] == [(1, 64, 4, 5)] * 2
    torch.testing.assert_close(final, model.forward_features(image))
    dict_out = model.forward_intermediates(_naflex_batch(model, 6, 0), output_fmt="NLC", output_dict=True)
    assert [tuple(m.shape) for m in dict_out["image_intermediates"]] == [(2, 16, 64)] * 2


def test_key_padding_is_what_the_mask_blocks_for_every_query():
    from muse_lightning.branch import key_padding_from_mask
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    bool_mask = (valid[:, None, :, None] & valid[:, None, None, :])  # NaFlex's symmetric mask, True = may attend
    float_mask = torch.zeros(2, 1, 5, 5).masked_fill(~bool_mask, float("-inf"))
    for mask in (bool_mask, float_mask, float_mask.clamp(min=torch.finfo(torch.float32).min)):
        assert torch.equal(key_padding_from_mask(mask), ~valid)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()  # the last key is blocked for all but one query
    assert not key_padding_from_mask(causal).any()


def test_swapped_sequence_model_stays_causal_under_is_causal():
    blocks = nn.Sequential(Block(32, 4, qkv_bias=True), Block(32, 4, qkv_bias=True)).eval()
    swap_attention(blocks)
    for branch in _branches(blocks):
        _random_branch(branch)
    x = torch.randn(2, 9, 32)
    moved = x.clone()
    moved[:, 6:] += 1.0
    run = lambda t: blocks[1](blocks[0](t, is_causal=True), is_causal=True)  # noqa: E731
    torch.testing.assert_close(run(moved)[:, :6], run(x)[:, :6])
    assert (run(moved)[:, 6:] - run(x)[:, 6:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "eva02_tiny_patch14_224", "vit_base_patch16_rope_224"])
def test_keys_the_attn_mask_blocks_are_not_read_by_the_convolution(name):
    model, x = _build(name, _SMALL if "rope" in name else _VIT)
    model, _, _ = _swap(model)
    for branch in _branches(model):
        _random_branch(branch)
    n = model.num_prefix_tokens
    blocked = torch.arange(n + 16) >= n + 12  # the bottom row of the 4 x 4 patch grid: no query may read it
    mask = (~blocked).expand(n + 16, -1)[None, None]
    moved = x.clone()
    moved[..., 24:, :] += 1.0  # only the bottom row's pixels
    a, b = model.forward_features(x, attn_mask=mask), model.forward_features(moved, attn_mask=mask)
    torch.testing.assert_close(a[:, ~blocked], b[:, ~blocked])
    assert (a[:, blocked] - b[:, blocked]).abs().max() > 1e-3


def test_spatial_reduction_branch_convolves_the_coarse_values_then_repeats_them_up():
    model, x = _build("pvt_v2_b0", dict(num_classes=5, input_size=64))
    model, _, _ = _swap(model)
    branch = model.stages[0].blocks[0].attn.muse  # 16 x 16 tokens, keys and values on an 8 x 8 grid (sr 8: 2 x 2)
    _random_branch(branch)
    seen = {}
    branch.register_forward_pre_hook(lambda m, args: seen.update(call=m._call, values=m._values[0]))  # test probe
    model(x)
    (h, w), (H, W) = seen["call"].values_grid, seen["call"].output_grid
    assert (H, W) == (16, 16) and (h, w) == (2, 2)
    values = seen["values"]
    conv = branch.conv(values, grid_size=(h, w)).unflatten(1, (h, w)).permute(0, 3, 1, 2)
    ref = branch.conv_proj(conv.repeat_interleave(H // h, 2).repeat_interleave(W // w, 3).flatten(2).transpose(1, 2))
    branch.stash(values)
    branch.see(CallLayout((h, w), (H, W)))
    got = branch(torch.zeros(values.shape[0], H * W, values.shape[-1]), lambda t: t.new_zeros(*t.shape[:-1], 32))
    torch.testing.assert_close(got, ref)




def _branch_delta(attn, *args):
    """What ``attn``'s branch adds to its output, on ``args``: with the (random) branch, minus without it."""
    branch = attn.muse
    out = attn(*args)
    saved = [p.detach().clone() for p in branch.parameters()]
    branch.silence()
    silent = attn(*args)
    with torch.no_grad():
        for p, value in zip(branch.parameters(), saved):
            p.copy_(value)
    return out - silent


def _stash_probe(branch):
    """The values each call hands ``branch`` (a test probe)."""
    seen = []
    branch.register_forward_pre_hook(lambda m, args: seen.append([v.detach() for v in m._values]))
    return seen


@pytest.mark.parametrize("block", [0, 1, 2])  # mask-unit attention, then the pooling blocks' global attention
def test_hiera_branch_convolves_the_unrolled_tokens_on_the_patch_grid(block):
    model, x = _build("hiera", _ZOO_KWARGS["hiera"])
    model, _, _ = _swap(model)
    attn = model.blocks[block].attn
    _random_branch(attn.muse)
    tokens = {}
    model.blocks[block].register_forward_pre_hook(lambda m, args: tokens.update(x=m.norm1(args[0])))  # test probe
    model(x)
    delta = _branch_delta(attn, tokens["x"])
    values = F.linear(tokens["x"], attn.qkv.weight, attn.qkv.bias)[..., 2 * attn.dim_out:]
    # timm's Reroll puts a block's tokens back on the grid: the values in the order of the block before a pooling one.
    grid = model.reroll(values, block - 1 if attn.q_stride > 1 else block)  # (B, H, W, C)
    conv = attn.muse.conv(grid.flatten(1, 2), grid_size=grid.shape[1:3]).unflatten(1, grid.shape[1:3])
    stride = round(attn.q_stride ** 0.5)
    expected = attn.muse.conv_proj(conv[:, ::stride, ::stride])
    torch.testing.assert_close(model.reroll(delta, block), expected, atol=1e-5, rtol=1e-4)


def test_twins_locally_grouped_branch_convolves_the_whole_map_and_never_its_padding():
    model, _ = _build("twins_svt_small", _ZOO_KWARGS["twins_svt_small"])
    model, _, _ = _swap(model)
    attn = model.blocks[0][0].attn  # windows of 4 x 4: an 18 x 18 grid is padded to 20 x 20
    _random_branch(attn.muse)
    x = torch.randn(2, 18 * 18, attn.dim)
    delta = _branch_delta(attn, x, (18, 18))
    values = F.linear(x, attn.qkv.weight, attn.qkv.bias)[..., 2 * attn.dim:]
    expected = attn.muse.conv_proj(attn.muse.conv(values, grid_size=(18, 18)))
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)


def test_strided_query_branch_takes_the_convolution_where_each_query_sits():
    model, _ = _build("levit_128s", dict(img_size=112, num_classes=5))
    model, _, _ = _swap(model)
    attn = model.stages[1].downsample.attn_downsample  # keys and values 7 x 7, queries every other one: 4 x 4
    _random_branch(attn.muse)
    x = torch.randn(2, 49, attn.kv.linear.in_features)
    delta = _branch_delta(attn, x)
    kv = levit.LinearNorm.forward(attn.kv, x)  # the layer itself, untapped: its BatchNorm's values
    values = kv.unflatten(-1, (attn.num_heads, -1))[..., attn.key_dim:].flatten(-2)
    conv = attn.muse.conv(values, grid_size=(7, 7)).unflatten(1, (7, 7))[:, ::2, ::2].flatten(1, 2)
    torch.testing.assert_close(delta, attn.muse.conv_proj(conv), atol=1e-5, rtol=1e-4)


def test_branch_joins_a_non_pointwise_output_layer_at_its_input():
    """LowFormer's output projection is an upsampling transposed convolution: the branch is added before it."""
    model, x = _build("lowformer_b0", _ZOO_KWARGS["lowformer_b0"])
    model, _, _ = _swap(model)
    attn = next(m for m in model.modules() if hasattr(m, "muse") and isinstance(m.upsampling, nn.ConvTranspose2d))
    _random_branch(attn.muse)
    inputs = {}
    attn.register_forward_pre_hook(lambda m, args: inputs.update(x=args[0]))  # test probe
    model(x)
    seen = _stash_probe(attn.muse)
    delta = _branch_delta(attn, inputs["x"])
    (values,) = seen[0]  # (B, h, w, C): the per-head V of its pointwise qkv
    h, w = values.shape[1:3]
    conv = attn.muse.conv_proj(attn.muse.conv(values.flatten(1, 2), grid_size=(h, w))).unflatten(1, (h, w))
    up = attn.upsampling
    expected = F.conv_transpose2d(conv.permute(0, 3, 1, 2), up.weight, None, up.stride, up.padding, groups=up.groups)
    torch.testing.assert_close(delta, expected[..., : delta.shape[-2], : delta.shape[-1]], atol=1e-5, rtol=1e-4)


def test_branch_joins_the_values_of_several_value_layers_in_their_order():
    """EfficientViT-MSRA's cascaded heads each have their own qkv: the branch convolves their values joined."""
    model, x = _build("efficientvit_m0", _ZOO_KWARGS["efficientvit_m0"])
    model, _, _ = _swap(model)
    attn = next(m for m in model.modules() if hasattr(m, "muse") and len(m.qkvs) > 1)
    seen = _stash_probe(attn.muse)
    outputs = {}
    for i, qkv in enumerate(attn.qkvs):
        qkv.register_forward_hook(lambda m, args, out, i=i: outputs.update({i: out}))  # test probe
    model(x)
    heads = [outputs[i][:, 2 * attn.key_dim:].permute(0, 2, 3, 1) for i in range(len(attn.qkvs))]
    assert len(seen[0]) == len(attn.qkvs)
    for got, expected in zip(seen[0], heads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("name", "kwargs", "count", "layouts", "left"), ZOO, ids=ZOO_IDS)
def test_checkpointed_backward_recomputes_each_call_on_its_own_layout(name, kwargs, count, layouts, left):
    """Under activation checkpointing, a forward on another image between a forward and its backward (multi-crop
    training) leaves the recomputed convolutions on the first image's grid: the gradients equal the plain
    backward's. The other image is the first one transposed (same tokens, another grid) where the model takes
    both, else the first image flipped."""
    model, x = _build(name, kwargs)
    if name in NO_CHECKPOINTING:
        with pytest.raises(AssertionError, match="gradient checkpointing not supported"):
            model.set_grad_checkpointing(True)
        return
    model, _, _ = _swap(model)
    with torch.no_grad():  # a live branch, so that its grid shows in the gradients
        for branch in _branches(model):
            if branch.conv_proj is not None:
                branch.conv_proj.weight.normal_(std=0.1)
    first = torch.randn(2, 3, x.shape[-2], x.shape[-1] * 3 // 2)
    try:  # without gradients: timm's eval-mode caches (LeViT's attention biases) then hold no graph
        with torch.no_grad():
            model(first), model(first.transpose(-2, -1))
        other = first.transpose(-2, -1)
    except Exception:  # the model's own limit: one grid
        first, other = x, x.flip(-1)
        with torch.no_grad():
            model(first)

    def gradients(intervene: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        out = _features(model, first)
        if intervene:
            _features(model, other)
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = gradients(False)
    model.set_grad_checkpointing(True)
    got = gradients(True)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-3, atol=1e-4, msg=n)
