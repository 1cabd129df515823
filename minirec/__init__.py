"""MiniRec core: data processing, prompts, policy wrapper, rewards, losses, metrics, selection math, curriculum, file I/O.

Framework-free (no Lightning Trainer in here): pure functions and small classes used by the Lightning modules.
"""

__version__ = "0.1.0"
