"""Sharded training of any MUSE model with PyTorch's FSDP2 (``fully_shard``), driven by Lightning.

``FSDP2Strategy`` is Lightning's ``ModelParallelStrategy`` with every process in one data-parallel mesh
(no tensor parallelism); the classifiers' ``configure_model`` hands their network to ``FSDP2Strategy.shard``,
which makes each block (each module of a block list that holds a token mixer) its own shard unit and the
network the root unit. Parameters, gradients and optimizer states live as 1/world-size shards on each process;
a block's full parameters exist only while it runs. Checkpoints are sharded folders by default
(``save_distributed_checkpoint``), one file a process plus Lightning's ``meta.pt``; a sharded run resumes
from its folder, and ``consolidate_checkpoint`` makes one ordinary checkpoint file of its weights
(``python -m muse_lightning.sharding FOLDER``) for ``test``, ``predict`` or any other strategy.
"""
from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .attention import MUSEAttention
from .branch import MUSEBranch

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["FSDP2Strategy", "consolidate_checkpoint", "shard_model", "shard_units"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model``: each outermost member of an ``nn.ModuleList`` / ``nn.Sequential`` that holds a
    MUSE mixer (``MUSEAttention``, or an attention with a ``MUSEBranch`` swapped in)."""
    units: list[nn.Module] = []
    taken: list[str] = []
    for name, parent in model.named_modules():
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)) or any(name.startswith(t) for t in taken):
            continue
        for child_name, child in parent.named_children():
            if any(isinstance(m, (MUSEAttention, MUSEBranch)) for m in child.modules()):
                units.append(child)
                taken.append(f"{name}.{child_name}." if name else f"{child_name}.")
    return units


def _compute_dtype(param_dtype: str | None) -> torch.dtype | None:
    if param_dtype is not None and param_dtype not in _DTYPES:
        raise ValueError(f"param_dtype must be one of {list(_DTYPES)} or None, got {param_dtype!r}")
    return _DTYPES[param_dtype] if param_dtype is not None else None


def shard_model(
        model: nn.Module,
        mesh: DeviceMesh,
        param_dtype: Literal["bf16", "fp16"] | None = None,
        activation_checkpointing: bool = False,
        reshard_after_forward: bool = True,
) -> None:
    """Shard ``model`` in place over the 1-D ``mesh`` with FSDP2: each block (``shard_units``) its own unit, then
    the rest as the root unit. Idempotent. The options are ``FSDP2Strategy``'s."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    units = shard_units(model)
    if not units:
        raise ValueError(f"{type(model).__name__} has no block list holding a MUSE mixer to shard")
    dtype = _compute_dtype(param_dtype)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for unit in units:
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(unit)  # in place: the parameter names stay the same
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    root_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=policy.reduce_dtype,
                                       output_dtype=torch.float32 if dtype else None)
    fully_shard(model, mesh=mesh, mp_policy=root_policy)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process, each MUSE block its own shard unit (``configs/fsdp.yaml``).

    Args:
        param_dtype: Compute in this precision (``"bf16"``, ``"fp16"``) with float32 parameter shards and
            float32 gradient reduction (FSDP2's ``MixedPrecisionPolicy``); None: the parameters' own dtype.
        activation_checkpointing: Recompute each block's activations in the backward pass instead of keeping
            them (less memory, about a third more compute).
        reshard_after_forward: Free a block's gathered parameters after its forward (ZeRO-3); False keeps them
            until the backward (ZeRO-2: more memory, one all-gather less a block).
        save_distributed_checkpoint: Sharded checkpoint folders; False: one file assembled on rank 0.
        timeout: The process group's timeout: how long a rank waits for a peer that stopped answering.
    """

    def __init__(
            self,
            param_dtype: Literal["bf16", "fp16"] | None = None,
            activation_checkpointing: bool = False,
            reshard_after_forward: bool = True,
            save_distributed_checkpoint: bool = True,
            timeout: timedelta = timedelta(minutes=10),
    ) -> None:
        _compute_dtype(param_dtype)  # a bad name fails here, not at the start of fit
        super().__init__(tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint,
                         timeout=timeout)
        self.param_dtype = param_dtype
        self.activation_checkpointing = activation_checkpointing
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # one mesh over every process
        super().setup_environment()

    def shard(self, model: nn.Module) -> None:
        """Shard ``model`` in place over every process with this strategy's options (``shard_model``)."""
        shard_model(model, self.device_mesh["data_parallel"], self.param_dtype, self.activation_checkpointing,
                    self.reshard_after_forward)


def consolidate_checkpoint(folder: str, output: str | None = None) -> Path:
    """Write a sharded checkpoint folder's weights as one Lightning checkpoint file (``output``, by default the
    folder's path with ``.consolidated`` added) and return its path. The file holds everything but the optimizer
    states (which ``fit`` resumes from the folder), so ``test``, ``predict`` and the other strategies read it.
    (Lightning's own ``consolidate_checkpoint`` reads only its FSDP strategy's folders.)"""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    source = Path(folder)
    if not (source / "meta.pt").is_file() or not (source / ".metadata").is_file():
        raise FileNotFoundError(f"folder: {source} is not a sharded checkpoint (it lacks meta.pt or .metadata)")
    target = Path(output) if output is not None else source.with_name(source.name + ".consolidated")
    if target.exists():
        raise FileExistsError(f"output: {target} already exists")
    checkpoint = torch.load(source / "meta.pt", map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(source, Path(tmp) / "full.pt")
        checkpoint["state_dict"] = torch.load(Path(tmp) / "full.pt", map_location="cpu", weights_only=True)["state_dict"]
    torch.save(checkpoint, target)
    return target


if __name__ == "__main__":
    from jsonargparse import CLI

    print(CLI(consolidate_checkpoint, as_positional=True))
