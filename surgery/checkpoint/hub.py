"""Hub checkpoints (``org/name`` and ``org/name@revision``), opened from remote headers.

Opening resolves the revision to its commit hash, downloads the small side files (config,
index, tokenizer) and reads each safetensors header with HTTP range requests: no weights move.
A weight file is downloaded into huggingface_hub's cache the first time a tensor in it is read,
or all at once by :meth:`RemoteCheckpoint.fetch`. When the Hub cannot be reached, a copy
already in the cache (``hf download``) is used instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from surgery.checkpoint.checkpoint import (
    INDEX_NAME,
    SINGLE_NAME,
    TOKENIZER_FILES,
    Checkpoint,
    _read_json,
    open_local,
)
from surgery.checkpoint.header import Header, header_length, parse_header
from surgery.errors import CheckpointError, HubError

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
FIRST_RANGE = 100_000  # bytes asked for first: enough for the header of most files


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def download_hint(self) -> str:
        rev = f" --revision {self.revision}" if self.revision else ""
        return f"`hf download {self.repo_id}{rev}`"


def parse_hub_id(spec: str) -> HubRef | None:
    """Return the Hub reference in ``spec`` if it looks like one, else None."""
    match = HUB_ID.match(spec)
    if not match or spec.startswith((".", "/", "~")):
        return None
    return HubRef(match["repo"], match["rev"])


@dataclass(eq=False)
class RemoteCheckpoint(Checkpoint):
    """A Hub checkpoint whose weight files are fetched on first read.

    ``sha256`` comes from the Hub's file listing (the LFS object ids), so provenance needs no
    local hashing.
    """

    repo_id: str = ""
    sha256: dict[Path, str] = field(default_factory=dict)

    def _fd(self, path: Path) -> int:
        if not path.is_file():
            self.fetch([path])
        return super()._fd(path)

    def missing(self, files: list[Path] | None = None) -> list[Path]:
        """The weight files (all, or of ``files``) not yet in the local cache."""
        return [f for f in (self.files if files is None else files) if not f.is_file()]

    def fetch(self, files: list[Path] | None = None) -> None:
        """Download the weight files (all, or ``files``) into huggingface_hub's cache."""
        for path in self.missing(files):
            _download(HubRef(self.repo_id, self.revision), path.relative_to(self.root).as_posix())

    def known_sha256(self) -> dict[Path, str]:
        return dict(self.sha256)


def network_errors() -> tuple[type[BaseException], ...]:
    """What huggingface_hub's calls raise when the Hub is unreachable or says no: its HTTP
    errors, OS errors, and the transport errors of the HTTP client it uses."""
    import importlib

    from huggingface_hub import get_session
    from huggingface_hub.errors import HfHubHTTPError

    client = importlib.import_module(type(get_session()).__module__.split(".")[0])
    transport = getattr(client, "TransportError", OSError)
    return (HfHubHTTPError, OSError, ValueError, transport)


def _hub_error(ref: HubRef, what: str, e: BaseException) -> HubError:
    text = str(e).strip()
    first_line = text.splitlines()[0] if text else type(e).__name__
    return HubError(
        f"Hub repo {ref}: {what} ({first_line}). Pre-download it with {ref.download_hint()} "
        "(the cache is used when the Hub cannot be reached) or pass a local path"
    )


def _download(ref: HubRef, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, filename, revision=ref.revision))
    except network_errors() as e:
        raise _hub_error(ref, f"cannot download {filename}", e) from e


def _read_remote_header(ref: HubRef, filename: str, size: int, local: Path) -> Header:
    """The header of a remote safetensors file, read with one or two range requests."""
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    url = hf_hub_url(ref.repo_id, filename, revision=ref.revision)
    headers = build_hf_headers()

    def get(first: int, last: int) -> bytes:
        response = get_session().get(url, headers={**headers, "Range": f"bytes={first}-{last}"},
                                     timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT)
        hf_raise_for_status(response)
        return response.content

    head = get(0, min(FIRST_RANGE, size) - 1)
    n = header_length(f"{ref}/{filename}", head, size)
    raw = head[8:8 + n] if len(head) >= 8 + n else get(8, 7 + n)
    if len(raw) != n:
        raise CheckpointError(f"{ref}/{filename}: the server sent {len(raw)} header bytes, "
                              f"expected {n}")
    return parse_header(local, raw, size)


def open_remote(spec: str, ref: HubRef) -> Checkpoint:
    """Open ``ref`` from the Hub reading headers only; fall back to the local cache offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise _hub_error(ref, "not found", e) from e
    except network_errors() as e:
        return _open_cached(spec, ref, e)
    commit = info.sha
    if not commit:
        raise HubError(f"Hub repo {ref}: the server did not say which commit the revision is")
    pinned = HubRef(ref.repo_id, commit)
    siblings = {s.rfilename: s for s in info.siblings or []}
    side = [n for n in ("config.json", INDEX_NAME, *TOKENIZER_FILES) if n in siblings]
    local = {n: _download(pinned, n) for n in side}
    root = local[side[0]].parent if side else None
    if INDEX_NAME in local:
        weight_map = _read_json(local[INDEX_NAME]).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{ref}/{INDEX_NAME}: missing or empty weight_map")
        names = sorted(set(weight_map.values()))
    elif SINGLE_NAME in siblings:
        names = [SINGLE_NAME]
    else:
        found = sorted(n for n in siblings if n.endswith(".safetensors") and "/" not in n)
        if len(found) != 1:
            raise CheckpointError(f"Hub repo {ref}: no {SINGLE_NAME} or {INDEX_NAME} "
                                  f"(found {len(found)} .safetensors files at the top level)")
        names = found
    for name in names:
        if name not in siblings:
            raise CheckpointError(f"Hub repo {ref}: {INDEX_NAME} lists {name!r}, which the "
                                  "repository does not hold")
    if root is None:
        root = _snapshot_dir(ref.repo_id, commit)
    headers = []
    sha256: dict[Path, str] = {}
    for name in names:
        sib = siblings[name]
        size = sib.lfs.size if sib.lfs else sib.size
        if size is None:
            raise HubError(f"Hub repo {ref}: the server did not give the size of {name}")
        try:
            headers.append(_read_remote_header(pinned, name, size, root / name))
        except network_errors() as e:
            raise _hub_error(ref, f"cannot read the header of {name}", e) from e
        if sib.lfs:
            sha256[root / name] = sib.lfs.sha256
    tensors = {}
    for header in headers:
        for tname, tinfo in sorted(header.tensors.items(), key=lambda kv: kv[1].start):
            if tname in tensors:
                raise CheckpointError(f"Hub repo {ref}: tensor {tname!r} appears in two files")
            tensors[tname] = tinfo
    if not tensors:
        raise CheckpointError(f"Hub repo {ref}: holds no tensors")
    config = _read_json(local["config.json"]) if "config.json" in local else {}
    return RemoteCheckpoint(
        source=spec, root=root, tensors=tensors, config=config, headers=headers,
        revision=commit, tokenizer_files=[local[n] for n in TOKENIZER_FILES if n in local],
        repo_id=ref.repo_id, sha256=sha256,
    )


def _snapshot_dir(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" \
        / commit


def _open_cached(spec: str, ref: HubRef, cause: BaseException) -> Checkpoint:
    """Open a complete copy from the local cache, or say how to make one."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision,
                                        local_files_only=True))
    except (OSError, ValueError) as e:
        raise _hub_error(ref, "cannot be reached and is not in the local cache", cause) from e
    return open_local(folder, source=spec, revision=folder.name)

