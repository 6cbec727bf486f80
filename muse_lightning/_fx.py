"""Whether ``torch.fx`` is tracing: shapes are then proxies, and checks on them cannot run."""
import torch


def is_tracing() -> bool:
    """True under ``torch.fx`` symbolic tracing (not under ``torch.compile``, which sees real shapes)."""
    trace = torch.fx._symbolic_trace
    return trace.is_fx_symbolic_tracing() if hasattr(trace, "is_fx_symbolic_tracing") else trace.is_fx_tracing()
