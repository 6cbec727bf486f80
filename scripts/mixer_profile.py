"""Where a mixer's time goes: PyTorch's profiler over forward+backward steps of timm's Attention and the MUSE
mixers (static 1-D and 2-D, dynamic) at the ViT-S/16 shape (a class token and 14 x 14 patches, width 384, 6
heads; batch 128 and bf16 autocast on CUDA), eager, on the convolution backend that ``MUSE_CONV_BACKEND`` names.
For each mixer it prints the ATen ops of a step that compute tensors (in eager mode each is a kernel or a few; counted below autograd, so
the backward's too; on CPU, with no autocast, without autocast's casts), the device kernels launched per step on
a GPU, and the ops by their own device time (CPU time on a CPU). Part of ``scripts/gpu_check.sh`` (its log is
the record); on CPU (a small batch) it gives the op counts:

    python scripts/mixer_profile.py [BATCH]     # BATCH: 128 (default)
"""
import sys

import torch
from timm.layers import Attention
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from muse_lightning import MixerOptions, MUSEAttention, conv

STEPS = 5


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched under it that compute tensors: not views, in-place view changes or
    ``_unsafe_view`` (which launch nothing), nor ops that return no tensor (``promote_types``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        metadata = func.is_view or torch.Tag.inplace_view in func.tags or func is torch.ops.aten._unsafe_view.default
        self.ops += not metadata and any(isinstance(t, torch.Tensor) for t in tree_leaves(out))
        return out


def main(batch: int) -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dim, heads = 384, 6
    mixers = {
        "timm Attention": Attention(dim, heads, qkv_bias=True),
        "MUSE static 1-D": MUSEAttention(dim, heads, qkv_bias=True),
        "MUSE static 2-D": MUSEAttention(dim, heads, qkv_bias=True, mixer=MixerOptions(conv_layout="2d"), num_prefix_tokens=1),
        "MUSE dynamic 1-D": MUSEAttention(dim, heads, qkv_bias=True, mixer=MixerOptions(conv_type="dynamic")),
    }
    x = torch.randn(batch, 197, dim, device=device, requires_grad=True)
    print(f"device={device} batch={batch} conv_backend={conv.CONV_BACKEND} torch={torch.__version__}; "
          f"{STEPS} eager forward+backward steps each", flush=True)
    for name, module in mixers.items():
        module.to(device)

        def step(module: torch.nn.Module = module) -> None:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
                out = module(x)
            out.float().sum().backward()

        for _ in range(3):
            step()
        module.zero_grad(set_to_none=True)  # as Lightning's optimizer steps leave them: no gradient accumulation
        x.grad = None
        with OpCounter() as counter:
            step()
        with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            for _ in range(STEPS):
                step()
            if cuda:
                torch.cuda.synchronize()
        kernels = sum(e.device_type == DeviceType.CUDA for e in prof.events()) / STEPS
        print(f"\n== {name}: {counter.ops} ATen ops per step"
              + (f", {kernels:.0f} device kernels" if cuda else ""), flush=True)
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 128)
