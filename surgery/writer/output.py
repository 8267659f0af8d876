"""The output directory: everything is written into ``OUT.partial/`` and renamed into place
only when complete, so a crash never leaves a model that looks whole. Completed shards are
recorded with their hash; a rerun of the same plan verifies and reuses them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from surgery.checkpoint.hashing import file_sha256
from surgery.errors import OutputExistsError, RunError

MARKER = ".weight-surgery-partial.json"
# Work a producer keeps in ``OUT.partial`` between runs (the fine-tune step's training state):
# kept while the fingerprint matches, removed when the output is committed.
SCRATCH = ".scratch"


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


class OutputDir:
    def __init__(self, final: Path, *, force: bool, inputs: list[Path]) -> None:
        self.final = Path(final).expanduser().absolute()
        self.partial = self.final.with_name(self.final.name + ".partial")
        resolved = self.final.resolve()
        for root in inputs:
            root = root.resolve()
            if _inside(resolved, root) or _inside(root, resolved):
                raise OutputExistsError(
                    f"{self.final}: output would overlap input {root}; choose another path"
                )
        if self.final.exists() and not force:
            raise OutputExistsError(
                f"{self.final}: already exists; pass --force (force=True) to replace it"
            )
        self.state: dict = {}

    def start(self, fingerprint: str) -> dict[str, str]:
        """Prepare ``OUT.partial``; return the verified complete shards of a matching earlier
        run (file name to SHA-256)."""
        marker = self.partial / MARKER
        reuse: dict[str, str] = {}
        if self.partial.exists():
            if not marker.is_file():
                raise OutputExistsError(
                    f"{self.partial}: exists and was not made by weight-surgery; remove it first"
                )
            try:
                old = json.loads(marker.read_text())
            except ValueError:
                old = {}
            if old.get("fingerprint") == fingerprint:
                for name, sha in old.get("shards", {}).items():
                    path = self.partial / name
                    if path.is_file() and file_sha256(path) == sha:
                        reuse[name] = sha
            else:
                shutil.rmtree(self.partial)
        self.state = {"fingerprint": fingerprint, "shards": dict(reuse)}
        created = not self.partial.exists()
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
            self._save_state()
        except OSError as e:
            if created:  # without its marker a rerun would take it for someone else's
                shutil.rmtree(self.partial, ignore_errors=True)
            raise RunError(f"{self.partial}: cannot write ({e.strerror}); free some space or "
                           "choose another output path, then rerun the same command") from e
        return reuse

    def _save_state(self) -> None:
        tmp = self.partial / (MARKER + ".tmp")
        tmp.write_text(json.dumps(self.state, sort_keys=True))
        os.replace(tmp, self.partial / MARKER)

    def record_shard(self, name: str, sha: str) -> None:
        self.state["shards"][name] = sha
        self._save_state()

    def path(self, name: str) -> Path:
        return self.partial / name

    def scratch(self) -> Path:
        """A folder inside ``OUT.partial`` for state that lets a rerun resume; it never
        reaches the final output."""
        folder = self.partial / SCRATCH
        folder.mkdir(exist_ok=True)
        return folder

    def write_text(self, name: str, text: str) -> None:
        (self.partial / name).write_text(text, encoding="utf-8")

    def copy_in(self, src: Path, name: str | None = None) -> None:
        shutil.copyfile(src, self.partial / (name or src.name))

    def commit(self) -> Path:
        """Rename the complete output into place (replacing an old one only now)."""
        (self.partial / MARKER).unlink()
        shutil.rmtree(self.partial / SCRATCH, ignore_errors=True)
        old = None
        if self.final.exists():
            old = self.final.with_name(f"{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        return self.final
