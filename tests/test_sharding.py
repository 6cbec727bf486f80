"""Sharded training (FSDP2Strategy, configs/fsdp.yaml) on 2 CPU processes over gloo: the blocks are the shard
units, a sharded fit ends where a single-process fit ends, and a sharded fit killed and resumed from its sharded
checkpoint ends where an uninterrupted one ends."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import KILLER, run_cli

from muse_lightning import FSDP2Strategy, ImageClassifier, SequenceClassifier, TextClassifier, swap_attention
from muse_lightning.sharding import consolidate_checkpoint, shard_model, shard_units

CONFIGS = Path(__file__).parents[1] / "configs"
# No dropout, drop-path or augmentation: two processes draw other random numbers than one does.
TINY_VIT = json.dumps({"embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.0})
FIT = ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.model_kwargs", TINY_VIT,
       "--data.init_args.augment", "false", "--trainer.limit_val_batches", "1"]
ON_TWO_CPUS = ["--config", str(CONFIGS / "fsdp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
               "--trainer.strategy.init_args.param_dtype", "null"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint file, or of a sharded checkpoint folder, consolidated as users do."""
    if path.is_dir():
        done = subprocess.run([sys.executable, "-m", "muse_lightning.sharding", str(path)], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        path = Path(done.stdout.strip())
    return {k: v for k, v in torch.load(path, weights_only=True)["state_dict"].items() if k.startswith("model.")}


@pytest.mark.parametrize("build", [
    lambda: ImageClassifier(model_kwargs={"embed_dim": 32, "depth": 3, "num_heads": 2}).model,
    lambda: swap_attention(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3)),
    lambda: TextClassifier(num_classes=3, dim=32, depth=3, num_heads=2).model,
    lambda: SequenceClassifier(num_classes=3, in_features=2, max_length=20, dim=32, depth=3).model,
], ids=["muse-vit", "swapped-timm-vit", "text", "sequence"])
def test_the_shard_units_are_the_blocks(build):
    model = build()
    units = shard_units(model)
    assert len(units) == 3 and all(any("attn" in n or "mixer" in n for n, _ in u.named_modules()) for u in units)
    assert len({id(u) for u in units}) == 3


def test_bad_strategy_options_are_named():
    with pytest.raises(ValueError, match=r"param_dtype must be one of \['bf16', 'fp16'\] or None, got 'fp8'"):
        FSDP2Strategy(param_dtype="fp8")


@pytest.mark.parametrize(("activation_checkpointing", "param_dtype"), [(False, None), (True, None), (False, "bf16")],
                         ids=["plain", "activation-checkpointing", "bf16-compute"])
def test_sharding_keeps_the_models_function(tmp_path, activation_checkpointing, param_dtype):
    """One process (a mesh of 1): the sharded model's outputs and gradients are the model's; with activation
    checkpointing each block runs again in the backward; with bf16 compute the blocks see bf16 and the loss
    float32 logits."""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(0)
    model = ImageClassifier(model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2}).model
    sharded = copy.deepcopy(model)
    x = torch.randn(3, 1, 28, 28)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shard_model(sharded, mesh, param_dtype=param_dtype, activation_checkpointing=activation_checkpointing)
        shard_model(sharded, mesh, param_dtype=param_dtype, activation_checkpointing=activation_checkpointing)  # idempotent
        calls, dtypes = [], []
        for unit in shard_units(sharded):
            unit.register_forward_pre_hook(lambda m, args: calls.append(1) or dtypes.append(args[0].dtype))
        out = sharded(x)
        out.square().sum().backward()
        ref = model(x)
        ref.square().sum().backward()
    finally:
        dist.destroy_process_group()
    assert out.dtype == torch.float32
    assert len(calls) == (4 if activation_checkpointing else 2)
    assert set(dtypes) == {torch.bfloat16 if param_dtype else torch.float32}
    tolerance = {"atol": 0.05, "rtol": 0.05} if param_dtype else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(out, ref, **tolerance)
    for (name, p), (_, q) in zip(model.named_parameters(), sharded.named_parameters()):
        grad = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        torch.testing.assert_close(grad, p.grad, **(tolerance if param_dtype else {"atol": 1e-4, "rtol": 1e-4}), msg=name)


def test_consolidating_what_is_not_a_sharded_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"folder: {tmp_path} is not a sharded checkpoint"):
        consolidate_checkpoint(str(tmp_path))
    for name in ("meta.pt", ".metadata"):
        (tmp_path / name).touch()
    (tmp_path / "out.ckpt").touch()
    with pytest.raises(FileExistsError, match="output: .*out.ckpt already exists"):
        consolidate_checkpoint(str(tmp_path), str(tmp_path / "out.ckpt"))


def test_a_sharded_fit_on_two_processes_ends_with_the_single_process_weights(tmp_path):
    """6 steps at 32 images a step: one process, or two with 16 each and every parameter sharded across them."""
    steps = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "6"]
    one = run_cli([*FIT, *steps, "--data.init_args.batch_size", "32", "--trainer.default_root_dir", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*FIT, *ON_TWO_CPUS, *steps, "--data.init_args.batch_size", "16", "--trainer.default_root_dir", "two"],
               tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    checkpoint = tmp_path / "two" / "checkpoints" / "last.ckpt"
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in checkpoint.iterdir()}  # sharded
    a, b = _weights(tmp_path / "one" / "checkpoints" / "last.ckpt"), _weights(checkpoint)
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)
    state = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 6 and all(s["exp_avg"].abs().max() > 0 for s in state["optimizer_states"][0]["state"].values())


def test_a_sharded_fit_killed_then_resumed_ends_where_an_uninterrupted_one_ends(tmp_path):
    """3 epochs of 27 steps on 2 processes; kill -9 of both at step 52, resumed from the sharded last.ckpt (50)."""
    (tmp_path / "killer.py").write_text(KILLER)
    fit = [*FIT, *ON_TWO_CPUS, "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "27",
           "--data.init_args.batch_size", "16"]
    whole = run_cli([*fit, "--trainer.default_root_dir", "whole"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = run_cli([*fit, "--trainer.default_root_dir", "cut", "--trainer.callbacks+=killer.KillAt",
                   "--trainer.callbacks.step", "52"], tmp_path)
    assert killed.returncode == -9
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 50
    resumed = run_cli([*fit, "--trainer.default_root_dir", "cut", "--ckpt_path", str(last)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 81
    a, b = _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt"), _weights(last)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
