"""``surgery drift-prior``: DRIFT's reasoning prior, reasoning minus target, into one file."""

from __future__ import annotations

import click
from surgery_cli.main import handle_errors, human_bytes
from surgery_cli.progress import ProgressBar


@click.command("drift-prior")
@click.argument("reasoning")
@click.argument("target")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Prior file (.safetensors).")
@click.option("--dtype", default=None, help="dtype of the file (default float32).")
@click.option("--map", "rules", multiple=True, metavar="REGEX=REPL",
              help="Rename REASONING's tensors onto TARGET's (repeatable; first match wins).")
@click.option("--allow-missing", multiple=True, metavar="PATTERN",
              help="Target projections allowed to have no prior (name, kind, glob, re:).")
@click.option("--device", default="auto", show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing file.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def drift_prior(reasoning: str, target: str, out: str, dtype: str | None,
                rules: tuple[str, ...], allow_missing: tuple[str, ...], device: str,
                force: bool, quiet: bool) -> None:
    """Write DRIFT's prior REASONING − TARGET over TARGET's attention and MLP projections
    (arXiv 2510.15050); `surgery train --drift PRIOR` biases a fine-tune toward it."""
    from surgery import load
    from surgery.errors import UsageError
    from surgery.methods.drift import drift_prior as make

    mapping: dict[str, str] = {}
    for rule in rules:
        pattern, sep, repl = rule.partition("=")
        if not sep or not pattern:
            raise UsageError(f"--map {rule!r}: expected REGEX=REPLACEMENT")
        mapping[pattern] = repl
    bar = ProgressBar(enabled=not quiet)
    try:
        res = make(load(reasoning), load(target), out, dtype=dtype, map=mapping or None,
                   allow_missing=list(allow_missing) or None, force=force, device=device,
                   progress=bar)
    finally:
        bar.close()
    missing = f"; {len(res.missing)} allowed missing" if res.missing else ""
    click.echo(f"wrote {res.path}: {res.tensors} projection(s), {human_bytes(res.bytes)}"
               f"{missing}")
