"""Resolving ``org/name`` and ``org/name@revision`` through huggingface_hub's cache."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import HubError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
SIDE_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(spec: str) -> HubRef | None:
    """Return the Hub reference in ``spec`` if it looks like one, else None."""
    match = HUB_ID.match(spec)
    if not match or spec.startswith((".", "/", "~")):
        return None
    return HubRef(match["repo"], match["rev"])


def download(ref: HubRef) -> tuple[Path, str]:
    """Fetch (or find in the cache) the files of ``ref``; return the local folder and commit."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=SIDE_PATTERNS)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(
            f"Hub repo {ref}: cannot be reached or resolved ({first_line}). Pre-download it with "
            f"`hf download {ref.repo_id}"
            + (f" --revision {ref.revision}" if ref.revision else "")
            + "` or pass a local path"
        ) from e
    path = Path(folder)
    return path, path.name
