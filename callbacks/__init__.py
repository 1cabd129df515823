"""Lightning callbacks: adapter export (more come with curriculum and scoring)."""

from callbacks.adapter_export import AdapterExport

__all__ = ["AdapterExport"]
