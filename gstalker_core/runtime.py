"""The one machine setting: which device every tensor of a stage lives on, and how the CPU
and the matrix units are used (``RuntimeConfig``).

A GPU stage calls ``configure(cfg.runtime)`` once and hands the device it returns to the data
(``conditions.FrameSource``) and the model (``.to(device)``), the way nerfstudio's trainer
hands its one device setting down. Nothing here enters a content key.
"""

from __future__ import annotations

import torch

from .config import PipelineConfig, RuntimeConfig
from .errors import ConfigError


def select_device(cfg: RuntimeConfig) -> torch.device:
    """``cfg.device`` as a torch device; ``auto`` is the first CUDA device when there is one."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device is {cfg.device!r} but this machine's torch sees no CUDA GPU",
                              "set runtime.device=auto (or cpu), or install the CUDA build of torch for the driver")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"runtime.device is {cfg.device!r} but this machine has "
                              f"{torch.cuda.device_count()} CUDA GPU(s)",
                              f"choose cuda:0 .. cuda:{torch.cuda.device_count() - 1}, or auto")
    return device


def configure(cfg: RuntimeConfig) -> torch.device:
    """Apply the thread count (torch's and numba's) and, on CUDA, the matrix precision;
    returns the stage's device."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        import numba

        numba.set_num_threads(min(cfg.threads, numba.config.NUMBA_NUM_THREADS))
    device = select_device(cfg)
    if device.type == "cuda":  # the CPU keeps exact float32 products whatever the setting
        torch.set_float32_matmul_precision(cfg.matmul_precision)
    return device


# where Adam's step runs fused, one kernel a parameter group: on an H200 the default (foreach)
# step took 7.5 ms of host time of a 52-60 ms rendering step (bench/RESULTS.md, 2026-12-04)
FUSED_ADAM_DEVICES = ("cuda",)


def adam(groups: list[dict], **options) -> torch.optim.Adam:
    """``torch.optim.Adam`` over the parameter ``groups``, fused where every parameter lives on
    a device of ``FUSED_ADAM_DEVICES``; elsewhere torch's default step."""
    devices = {p.device.type for group in groups for p in group["params"]}
    fused = True if devices and devices <= set(FUSED_ADAM_DEVICES) else None
    return torch.optim.Adam(groups, fused=fused, **options)


def on_gpu(cfg: PipelineConfig, index: int) -> PipelineConfig:
    """``cfg`` pinned to CUDA device ``index`` (the GPU slot a worker's stage holds), unless it
    asks for the CPU or CUDA is absent. A copy: the content keys are unchanged."""
    if cfg.runtime.device == "cpu" or not torch.cuda.is_available():
        return cfg
    return cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"device": f"cuda:{index}"})})
