"""Lightning callbacks: adapter export, curriculum stages, resume checkpoints, score writing and selection."""

from callbacks.adapter_export import AdapterExport
from callbacks.curriculum import CurriculumCallback
from callbacks.resume_checkpoint import ResumeCheckpoint
from callbacks.score_writer import ScoreWriter

__all__ = ["AdapterExport", "CurriculumCallback", "ResumeCheckpoint", "ScoreWriter"]
