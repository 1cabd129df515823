"""Test-only DeepSpeed strategy that runs on CPU processes (gloo), so multi-device DeepSpeed paths run without a GPU.

Lightning's `DeepSpeedStrategy` refuses any accelerator but CUDA, and DeepSpeed's `initialize` needs an integer device
index. This subclass skips only that guard, talks over gloo, and gives each process the device `cpu:<local_rank>`.
DeepSpeed must pick its CPU accelerator (`DS_ACCELERATOR=cpu`, set here too, before DeepSpeed's first use), and nothing
may need compiling: the shared-memory all-reduce op is switched off (gloo is used) and the optimizer must be a torch one
(DeepSpeed's fused / CPU Adam are JIT-compiled).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

PRESETS = Path(__file__).resolve().parents[1] / "configs" / "strategy"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` on CPU processes: no CUDA check, gloo, indexed CPU devices (root `cpu:<local_rank>`)."""

    def __init__(self, **kwargs: Any) -> None:
        os.environ["DS_ACCELERATOR"] = "cpu"  # read when DeepSpeed first picks its accelerator
        super().__init__(**{"process_group_backend": "gloo", **kwargs})
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            raise RuntimeError("DeepSpeed chose a non-CPU accelerator; run with DS_ACCELERATOR=cpu in the environment")
        # DeepSpeed's shared-memory all-reduce is a C++ op compiled on first use (about a minute); gloo does the job
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # the parent's, minus DeepSpeedStrategy's CUDA-only guard

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        """Index the CPU devices 0..n-1, so `root_device` is `cpu:<local_rank>`: DeepSpeed reads
        `device_rank=root_device.index` and Lightning checks the indices match the local ranks."""
        self._parallel_devices = None if devices is None else [torch.device("cpu", i) for i in range(len(devices))]


def preset_init_args(name: str) -> dict[str, Any]:
    """`trainer.strategy.init_args` of the shipped preset configs/strategy/<name>.yaml."""
    return yaml.safe_load((PRESETS / f"{name}.yaml").read_text())["trainer"]["strategy"]["init_args"]

