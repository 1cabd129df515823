"""Lightning modules: RecPO training / evaluation and MiniRec scoring."""

from lightning_modules.grpo import GRPOModule
from lightning_modules.scoring import ScoringModule

__all__ = ["GRPOModule", "ScoringModule"]
