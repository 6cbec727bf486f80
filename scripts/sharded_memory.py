"""Per-process memory of a model's parameters, gradients and AdamW states, on one process and sharded by FSDP2
over 2 and 4 (gloo, CPU; sharded as FSDP2Strategy shards, float32). Prints a table, writes JSON.

    python scripts/sharded_memory.py --model muse_vit_base_patch16_224 --out results/sharded_memory.json
"""
import json
import os
import tempfile

import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import muse_lightning  # noqa: F401  (registers the muse_vit_* models)
from muse_lightning.sharding import shard_model


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)


def _run(rank: int, world: int, name: str, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        shard_model(model, init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    size = model.pretrained_cfg["input_size"]
    model(torch.randn(2, *size)).sum().backward()
    optimizer.step()
    if rank == 0:
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
        row = {"processes": world, "parameters": _local_bytes(model.parameters()),
               "gradients": _local_bytes(p.grad for p in model.parameters()), "adamw_states": _local_bytes(states)}
        with open(out, "w") as f:
            json.dump(row, f)
    dist.destroy_process_group()


def main(model: str = "muse_vit_base_patch16_224", processes: tuple[int, ...] = (1, 2, 4),
         out: str = "results/sharded_memory.json") -> None:
    """Measure ``model`` on each count of ``processes``; print the table, write ``out``."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, world in enumerate(processes):
            row_file = os.path.join(tmp, f"{world}.json")
            mp.spawn(_run, args=(world, model, 29500 + i, row_file), nprocs=world)
            with open(row_file) as f:
                rows.append(json.load(f))
    params = sum(p.numel() for p in timm.create_model(model).parameters())
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print(f"{model}, {params / 1e6:.1f}M parameters; MiB a process (float32, AdamW)\n")
    print("| processes | parameters | gradients | AdamW states | total | x one process |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for row in rows:
        total = row["parameters"] + row["gradients"] + row["adamw_states"]
        base = base or total
        print(f"| {row['processes']} | {mib(row['parameters'])} | {mib(row['gradients'])} | {mib(row['adamw_states'])} "
              f"| {mib(total)} | {total / base:.2f} |")
        row["total"] = total
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"model": model, "parameters": params, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
