"""Floor 2: evaluating expression graphs, tensor by tensor, into output directories."""

from surgery.engine.run import SaveResult, estimate_peak_bytes, parse_dtype, plan_output, save
from surgery.engine.stream import Profile, ProgressEvent, StreamOptions, resolve_device

__all__ = ["Profile", "ProgressEvent", "SaveResult", "StreamOptions", "estimate_peak_bytes",
           "parse_dtype", "plan_output", "resolve_device", "save"]
