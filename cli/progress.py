"""A tqdm progress bar driven by the library's progress callbacks."""

from __future__ import annotations

from tqdm import tqdm

from surgery.engine import ProgressEvent


class ProgressBar:
    """One bar per pass (statistics pass, write pass), in bytes, with tensors in the postfix."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.phase: str | None = None

    def __call__(self, event: ProgressEvent) -> None:
        if not self.enabled:
            return
        if event.phase == "output":
            self.close()
            tqdm.write(f"writing {event.name}")
            return
        if self.bar is None or self.phase != event.phase or event.done == 1:
            self.close()
            label = "statistics" if event.phase == "reduce" else "merging"
            self.bar = tqdm(total=event.bytes_total, unit="B", unit_scale=True, desc=label,
                            dynamic_ncols=True, leave=True)
            self.phase = event.phase
        self.bar.update(event.bytes_done - self.bar.n)
        self.bar.set_postfix_str(f"{event.done}/{event.total} tensors", refresh=False)
        if event.done == event.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
