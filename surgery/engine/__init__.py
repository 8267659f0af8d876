"""Floor 2: evaluating expression graphs, tensor by tensor, into output directories."""

from surgery.engine.run import (
    SaveResult,
    download_bytes,
    estimate_peak_bytes,
    needed_files,
    output_fingerprint,
    parse_dtype,
    plan_output,
    save,
)
from surgery.engine.stream import Profile, ProgressEvent, StreamOptions, resolve_device

__all__ = ["Profile", "ProgressEvent", "SaveResult", "StreamOptions", "download_bytes",
           "estimate_peak_bytes", "needed_files", "output_fingerprint", "parse_dtype",
           "plan_output", "resolve_device", "save"]
