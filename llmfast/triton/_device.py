"""Device facts the Triton launchers size their grids with."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device. Triton's CPU interpreter runs programs one after
    another: for CPU tensors a few programs are enough to exercise the persistent loops."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
