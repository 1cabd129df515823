"""Lightning callbacks: adapter export, curriculum stages, score writing and selection."""

from callbacks.adapter_export import AdapterExport
from callbacks.curriculum import CurriculumCallback
from callbacks.score_writer import ScoreWriter

__all__ = ["AdapterExport", "CurriculumCallback", "ScoreWriter"]
