"""Floor 2: statistics over checkpoints, streamed one tensor at a time, and their plots."""

from surgery.analysis.diff import DiffReport, GroupDiff, diff_checkpoints

__all__ = ["DiffReport", "GroupDiff", "diff_checkpoints"]
