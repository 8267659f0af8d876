"""``surgery extract-lora``: a fine-tune's task vector as a PEFT LoRA adapter."""

from __future__ import annotations

import click
from surgery_cli.main import handle_errors
from tqdm import tqdm


@click.command("extract-lora")
@click.argument("finetuned")
@click.argument("base")
@click.option("--rank", "-r", required=True, type=click.IntRange(min=1),
              help="Rank of each layer's adapter (at most min(out, in)).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False),
              help="Adapter directory.")
@click.option("--keep-full", default="", metavar="KINDS",
              help="Comma-separated tensor kinds kept at full rank in modules_to_save "
              "(embedding, norm, head, ...).")
@click.option("--include", multiple=True, metavar="REGEX", help="Decompose only these modules.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Leave these modules out.")
@click.option("--distribute-scale/--no-distribute-scale", default=True, show_default=True,
              help="Split √S between A and B (else A = S Vᵀ, B = U).")
@click.option("--dtype", default=None, help="dtype of A and B (default: the fine-tune's).")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run.")
@click.option("--force", is_flag=True, help="Replace an existing adapter directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@handle_errors
def extract_lora(finetuned: str, base: str, rank: int, out: str, keep_full: str,
                 include: tuple[str, ...], exclude: tuple[str, ...], distribute_scale: bool,
                 dtype: str | None, device: str, force: bool, quiet: bool) -> None:
    """Write FINETUNED − BASE as a PEFT LoRA adapter (truncated SVD of each linear layer's
    task vector, as mergekit-extract-lora); `peft.PeftModel.from_pretrained(BASE, OUT)`
    loads it. Prints each layer's relative error ‖τ − BA‖/‖τ‖ summary."""
    from surgery import load
    from surgery.methods.lora_extract import extract_lora as run

    bar = None if quiet else tqdm(desc="decomposing", unit="layer", dynamic_ncols=True)

    def progress(e) -> None:
        if bar is not None:
            bar.total = e.total
            bar.update(e.done - bar.n)
            bar.set_postfix_str(e.module, refresh=False)

    try:
        res = run(load(finetuned), load(base), out, rank=rank,
                  keep_full=[k.strip() for k in keep_full.split(",") if k.strip()],
                  include=list(include) or None, exclude=list(exclude) or None,
                  distribute_scale=distribute_scale, dtype=dtype, force=force, device=device,
                  progress=progress)
    finally:
        if bar is not None:
            bar.close()
    worst = max(res.layers, key=lambda r: r.relative_error)
    click.echo(f"wrote {res.path}: {len(res.layers)} layers at rank <= {rank}, "
               f"{len(res.full_modules)} module(s) at full rank")
    click.echo(f"relative error ‖τ − BA‖/‖τ‖: mean {res.mean_error:.4f}, worst "
               f"{worst.relative_error:.4f} ({worst.module}); per layer in "
               f"{res.path / 'extraction.json'}")
    if res.uncaptured:
        click.echo(f"not in the adapter: {len(res.uncaptured)} changed tensor(s), e.g. "
                   f"{res.uncaptured[0]} (--keep-full embedding,norm,head keeps them)")
