"""Pushing a finished output directory to the Hub in one commit.

The token comes from huggingface_hub's usual places (``HF_TOKEN``, the stored login); this
module never reads, prints or writes it. Only complete outputs are pushed: not a ``.partial``
directory, not one holding the partial-run marker, not one whose index lists missing shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint.checkpoint import INDEX_NAME
from surgery.checkpoint.hub import network_errors
from surgery.errors import HubError, OutputExistsError, UsageError
from surgery.writer.output import MARKER


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    revision: str
    commit: str
    url: str
    files: list[str]


def check_complete(folder: Path) -> list[str]:
    """The files of a complete output directory, relative to it; refuse anything else."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a directory")
    if folder.name.endswith(".partial") or (folder / MARKER).exists():
        raise OutputExistsError(f"{folder}: is an unfinished run (partial output); finish it by "
                                "rerunning the same command, then push the final directory")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as e:
            raise UsageError(f"{index}: cannot parse the shard index ({e})") from e
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise OutputExistsError(f"{index}: lists shard {missing[0]!r}, which is missing; "
                                    "the output is incomplete")
    elif not (folder / "model.safetensors").is_file():
        raise UsageError(f"{folder}: holds no model.safetensors or {INDEX_NAME}")
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def commit_message(folder: Path) -> str:
    """``Upload NAME made by weight-surgery from recipe RECIPE`` (the recipe named in the
    provenance record, when there is one)."""
    recipe = None
    try:
        recipe = json.loads((folder / "provenance.json").read_text()).get("recipe_name")
    except (OSError, ValueError, AttributeError):
        pass
    if recipe is None and (folder / "recipe.yaml").is_file():
        recipe = "recipe.yaml"
    return f"Upload {folder.name} made by weight-surgery" + (
        f" from recipe {recipe}" if recipe else " (Python API, no recipe)")


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False,
                revision: str | None = None, message: str | None = None) -> PushResult:
    """Create ``repo_id`` if needed (and the branch ``revision``), then upload ``folder`` in
    one commit. A rejected commit changes nothing on the remote."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    path = Path(folder)
    files = check_complete(path)
    api = HfApi()
    branch = revision or "main"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.upload_folder(folder_path=path, repo_id=repo_id, revision=branch,
                                 commit_message=message or commit_message(path))
    except HfHubHTTPError as e:
        raise HubError(f"push to {repo_id}@{branch} failed; no files were committed "
                       f"({_reason(e)})") from e
    except network_errors() as e:
        raise HubError(f"push to {repo_id}@{branch} failed; no files were committed "
                       f"({_reason(e)})") from e
    return PushResult(repo_id, branch, info.oid, info.commit_url, files)


def _reason(e: BaseException) -> str:
    """The server's own message when it gave one, else the first line of the error."""
    response = getattr(e, "response", None)
    server = getattr(e, "server_message", None)
    status = getattr(response, "status_code", None)
    text = server or (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"HTTP {status}: {text}" if status else text
