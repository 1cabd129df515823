"""Lightning modules."""

from lightning_modules.grpo import GRPOModule

__all__ = ["GRPOModule"]
