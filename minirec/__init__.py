"""MiniRec core: data processing, prompts, policy wrapper, rewards, losses, metrics, selection math, curriculum, file I/O.

Framework-free (no Lightning Trainer in here): pure functions and small classes used by the Lightning modules. Importing
it registers one exit hook, `end_process_group`, so every entry point (CLI, benchmarks, scripts) gets it.
"""

import atexit

import torch.distributed

__version__ = "0.1.0"


def end_process_group() -> None:
    """Destroy the default process group, if one was made, while the interpreter is still whole. Lightning does this
    only for NCCL; a gloo group (CPU DDP) left to interpreter shutdown can abort a run that succeeded (SIGABRT,
    "terminate called without an active exception") when its worker threads free tensors without a live interpreter."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


atexit.register(end_process_group)
