"""What a benchmark or comparison record says of the machine it was measured on."""
from __future__ import annotations

import platform
from pathlib import Path

import torch

__all__ = ["cpu_name", "machine_record"]


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else what ``platform`` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine_record(device: str = "cpu") -> dict[str, str | int]:
    """Torch's threads, the processor, torch's version and, for ``device="cuda"``, the GPU's name."""
    record: dict[str, str | int] = {"threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__}
    if device == "cuda":
        record["gpu"] = torch.cuda.get_device_name()
    return record
