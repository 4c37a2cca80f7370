"""``mammo weights fetch [NAMES]``: the one command that downloads pretrained weights (see
:mod:`mammo_core.sources.weights_fetch`). Stages never download; they read what this command put in the cache."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console(stderr=True)
weights_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="Pretrained weights: fetch torchvision's files into the local torch hub cache.")


@weights_app.command("fetch")
def fetch(
    names: list[str] = typer.Argument(None, help="any of densenet121 resnet50 vgg16 inception_v3 frcnn_r50 "
                                                 "(default: all)"),
    base_url: str | None = typer.Option(None, "--base-url", help="fetch the same file names from this folder URL "
                                        "instead of download.pytorch.org (or $MAMMO_WEIGHTS_BASE_URL)"),
) -> None:
    """Download torchvision's weight files into the torch hub cache, checked the way torchvision checks them.

    Each file's SHA-256 must start with the hash prefix in its name (densenet121-a639ec97.pth); a file that
    does not is refused and removed. An interrupted download resumes from its .partial file. A verified file
    already in the cache is kept. The cache is torch.hub.get_dir()/checkpoints (set TORCH_HOME to move it).
    """
    from mammo_core.sources import (  # torchvision only when the command runs, not for every `mammo`
        weights_fetch,
    )

    known = weights_fetch.torchvision_urls()
    wanted = names or list(known)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        console.print(f"[bold red]unknown weights {', '.join(unknown)}[/]; known: {', '.join(known)}")
        raise typer.Exit(2)
    failed = 0
    for name in wanted:
        try:
            got = weights_fetch.fetch(name, base_url=base_url)
        except weights_fetch.HashMismatch as exc:
            console.print(f"[bold red]refused {name}:[/] {exc}")
            failed += 1
        except OSError as exc:
            console.print(f"[bold red]could not fetch {name}:[/] {exc} (run again to resume)")
            failed += 1
        else:
            console.print(f"{name}: {got.status} {got.path} (sha256 {got.sha256[:16]}...)")
    if failed:
        raise typer.Exit(1)
