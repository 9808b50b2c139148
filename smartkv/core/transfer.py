"""Host values to the device without waiting for its stream."""
from __future__ import annotations

import torch


def host_to(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Host values (a list, an array, a CPU tensor) as a tensor on `device`. On CUDA through pinned memory, copied
    asynchronously: a copy from pageable memory waits for everything queued on the stream first, and a prefill's
    small tables (counts, class ids, observers) waited that way several times a layer."""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
