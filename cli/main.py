"""``surgery``: plan, apply and inspect weight operations."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from surgery.errors import SurgeryError


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def human_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn our exceptions into one line on stderr and the exit code (2 usage, 1 runtime)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SurgeryError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)

    return wrapper


# click >= 8.2 raises this for a group called without a command (8.1 prints help and exits).
NO_ARGS_IS_HELP: tuple[type[click.ClickException], ...] = tuple(
    c for c in (getattr(click.exceptions, "NoArgsIsHelpError", None),) if c is not None)


class OneLineErrors(click.Group):
    """Click's own argument errors (a missing option, a bad choice) as one line, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NO_ARGS_IS_HELP as e:
            e.show()  # `surgery` alone: the help text, as click prints it
            sys.exit(e.exit_code)
        except click.ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("interrupted; rerun the same command to resume", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="weight-surgery")
def main() -> None:
    """Post-hoc operations on model weights: merge, scale, sparsify, graft, prune."""


def _register() -> None:
    from surgery_cli import commands

    for command in commands.COMMANDS:
        main.add_command(command)


_register()


def run() -> None:
    """The ``surgery`` console script: :data:`main`, then a quick exit. Every output is
    complete (written, fsync'd and renamed) when a command returns; tearing down torch at
    interpreter exit would still take about 0.35 s on the benchmark machine, so the process
    flushes its streams and ends without it."""
    code: int | str | None = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message"): printed, then exit 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
