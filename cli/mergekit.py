"""mergekit configs on the command line: ``surgery apply config.yml OUT`` (mergekit-yaml's
argument order and common flags) and ``surgery convert config.yml -o recipe.yaml``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from surgery_cli.main import handle_errors

if TYPE_CHECKING:
    from surgery.recipe import Recipe

# mergekit-yaml's flags that mean nothing here, and why.
NO_EFFECT = {
    "allow_crimes": "--allow-crimes: not needed; inputs are checked by tensor names and shapes, "
                    "not by architecture names",
    "lazy_unpickle": "--lazy-unpickle: not needed; safetensors are always read lazily and "
                     "pickles are never unpickled",
    "copy_tokenizer": "--copy-tokenizer: the tokenizer files are always written with the model",
}


def mergekit_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """mergekit-yaml's common flags, for ``surgery apply`` with a mergekit config."""
    for option in reversed([
        click.option("--cuda", is_flag=True, help="mergekit config: compute on the GPU."),
        click.option("--copy-tokenizer", is_flag=True,
                     help="mergekit config: accepted (the tokenizer is always copied)."),
        click.option("--allow-crimes", is_flag=True,
                     help="mergekit config: accepted (shapes are checked instead)."),
        click.option("--out-shard-size", metavar="SIZE",
                     help="mergekit config: bytes per output shard (5B, 500M, ...)."),
        click.option("--lazy-unpickle", is_flag=True,
                     help="mergekit config: accepted (reads are always lazy)."),
    ]):
        fn = option(fn)
    return fn


def load_for_apply(path: str, out_path: str | None, flags: dict[str, Any]) -> Recipe:
    """The recipe ``surgery apply`` runs: a native recipe, or a mergekit config translated."""
    from surgery.errors import UsageError
    from surgery.recipe import load_recipe
    from surgery.recipe.mergekit import is_mergekit_config, load_mergekit, parse_kmb, read_config

    given = [k for k, v in flags.items() if v]
    if not (Path(path).is_file() and is_mergekit_config(read_config(path))):
        if out_path is not None:
            raise UsageError(f"{path}: OUT_PATH is for mergekit configs (with merge_method); a "
                             "recipe names its output path in output:")
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} is a mergekit-yaml flag, for mergekit configs; a recipe "
                             "sets device and shard_size in output:")
        return load_recipe(path)
    if out_path is None:
        raise UsageError(f"{path} is a mergekit config: give the output directory too "
                         "(surgery apply CONFIG OUT_PATH)")
    shard = parse_kmb(flags["out_shard_size"]) if flags.get("out_shard_size") else None
    recipe, translation = load_mergekit(path, out_path, device="cuda" if flags.get("cuda")
                                        else None, shard_size=shard)
    for key in given:
        if key in NO_EFFECT:
            click.echo(f"note: {NO_EFFECT[key]}", err=True)
    for note in translation.notes:
        click.echo(f"note: {note}", err=True)
    return recipe


def load_for_plan(path: str) -> Recipe:
    """The recipe ``surgery plan`` shows: a native recipe, or a mergekit config translated
    (written to ./merged)."""
    from surgery.recipe import load_recipe
    from surgery.recipe.mergekit import is_mergekit_config, load_mergekit, read_config

    if Path(path).is_file() and is_mergekit_config(read_config(path)):
        return load_mergekit(path, "merged")[0]
    return load_recipe(path)


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
              help="Where to write the native recipe.")
@click.option("--out-path", default="merged", show_default=True,
              help="The model directory the recipe writes.")
@click.option("--force", is_flag=True, help="Replace an existing recipe file.")
@handle_errors
def convert(config: str, output: str, out_path: str, force: bool) -> None:
    """Translate a mergekit CONFIG into an equivalent native recipe."""
    from surgery.errors import OutputExistsError
    from surgery.recipe.mergekit import build_translated, read_config, translate

    target = Path(output)
    if target.exists() and not force:
        raise OutputExistsError(f"{target} exists; pass --force to replace it")
    translation = translate(read_config(config), config, out_path)
    header = f"# Translated from the mergekit config {Path(config).name} by surgery convert.\n"
    header += "".join(f"# note: {n}\n" for n in translation.notes)
    text = translation.text(header)
    build_translated(translation, config)  # the recipe we write must validate as it stands
    target.write_text(text, encoding="utf-8")
    click.echo(f"wrote {target} ({len(translation.recipe['steps'])} step(s)); run it with "
               f"surgery apply {target}")
