"""``mammo similar IMAGE``: the k training lesions nearest to an image, from a finished pipeline run.

The train, features and hashing stage folders are found the way ``mammo status`` finds them (stage keys
computed from the params), so the answer always comes from the model, fusion weights and codes of exactly
these params. Loading goes through the stages' own loaders (weights read with ``weights_only=True``).
The output never names the image path or a patient: CBIS paths and ids carry patient ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from flows import environment
from mammo_core.config import Params
from mammo_core.errors import BadItem
from mammo_core.storage import stage_files

if TYPE_CHECKING:  # imported where used: they load torch, which every other mammo command does without
    from mammo_core.codes.similar import SimilarCaseIndex
    from mammo_core.data import patches

NEEDED_STAGES = ("train", "features", "hashing")
console = Console(stderr=True)


def load_index(
    train_dir: str | Path,
    features_dir: str | Path,
    hashing_dir: str | Path,
    decoder: str = "hash",
    bits: int = 48,
    *,
    patch: patches.PatchSettings | None = None,
    cache_max_side: int | None = None,
    device: str = "cpu",
) -> SimilarCaseIndex:
    """A :class:`SimilarCaseIndex` from finished train/features/hashing stage folders.

    The features and codes must come from this train folder's model (its folder name is its key):
    otherwise a ValueError names both keys. ``patch`` defaults to the patches defaults at the model's
    patch size; pass the run's patches settings (and the curate ``max_side``) to cut boxes like that run.
    """
    from mammo_core.codes.similar import SimilarCaseIndex, read_code_database, read_fusion_weights
    from mammo_core.data import patches
    from tasks.stages.hashing import CODES_FILE, DECODERS, load_decoder
    from tasks.stages.train import load_trained

    train_dir, features_dir, hashing_dir = Path(train_dir), Path(features_dir), Path(hashing_dir)
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; use one of {list(DECODERS)}")
    weights, features_key = read_fusion_weights(features_dir / stage_files.FEATURES.fusion)
    train_key = train_dir.name
    if features_key is not None and features_key != train_key:
        raise ValueError(f"{features_dir}: features of model {features_key}, not of the train stage {train_key}")
    db = read_code_database(hashing_dir / CODES_FILE, decoder, bits)
    if db["model_key"] is not None and db["model_key"] != train_key:
        raise ValueError(f"{hashing_dir}: codes of model {db['model_key']}, not of the train stage {train_key}")
    hashing_config = json.loads((hashing_dir / stage_files.HASHING.summary).read_text(encoding="utf-8"))
    if bits not in hashing_config["bits"]:
        raise ValueError(f"{hashing_dir}: no {bits}-bit decoder; trained code lengths are {hashing_config['bits']}")
    model, config = load_trained(train_dir)  # the slow part last: bad folders fail fast
    size = int(config["patch_size"])
    patch = patches.PatchSettings(size=size) if patch is None else patches.PatchSettings(
        **{**vars(patch), "size": size})
    return SimilarCaseIndex(
        model, weights, load_decoder(hashing_dir, decoder, bits), db["codes"], db["case_ids"], db["labels"],
        db["class_names"], patch, cache_max_side=cache_max_side, device=device,
    )


def stage_folders(p: Params, store_root: Path) -> dict[str, Path]:
    """The finished folders of the stages similar-case search needs; LookupError names what is missing."""
    from mammo_core.storage.store import ArtifactStore
    from tasks.registry import stage_keys

    art = ArtifactStore(store_root)
    keys = stage_keys(p)
    found: dict[str, Path] = {}
    for name in NEEDED_STAGES:
        folder = art.find(name, keys[name])
        if folder is None:
            raise LookupError(f"stage {name} (key {keys[name]}) has not finished in store {store_root}")
        found[name] = folder.path
    return found


def _table(results: list[dict], decoder: str, bits: int, database: int) -> Table:
    table = Table(title=f"similar cases ({decoder} decoder, {bits} bits, {database} training cases)")
    for col in ("rank", "case", "class", "pathology", "distance", "row"):
        table.add_column(col)
    for r in results:
        table.add_row(str(r["rank"]), r["source_id"], r["class_name"], r["pathology"] or "-", str(r["distance"]),
                      str(r["row"]))
    return table


def similar(
    image: Path = typer.Argument(..., help="query image: DICOM (modality MG) or PNG/JPEG; a patch or a mammogram"),
    k: int = typer.Option(5, "-k", "--k", min=1, help="number of similar cases"),
    box: str | None = typer.Option(None, "--box", help="lesion box x0,y0,x1,y1 in image pixels (full mammogram)"),
    params: Path = typer.Option(Path("params/default.yaml"), "-p", "--params", help="params YAML of the run"),
    set_: list[str] = typer.Option([], "--set", help="override, e.g. --set hashing.epochs=5"),
    store: Path | None = typer.Option(None, "--store", help="artifact store (default $MAMMO_STORE or .mammo)"),
    decoder: str = typer.Option("hash", "--decoder", help="hash (divide-and-encode) or fc"),
    bits: int = typer.Option(48, "--bits", help="code length (one of hashing.bits)"),
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """The k training lesions nearest to IMAGE by Hamming distance of their hash codes."""
    from mammo_core.codes.similar import check_query, parse_box, read_query_image
    from mammo_core.data import patches

    p = environment.load_params_or_exit(params, set_)
    try:
        parsed_box = parse_box(box) if box is not None else None
    except ValueError as exc:
        console.print(f"[bold red]invalid --box[/] {exc}")
        raise typer.Exit(2) from None
    root = environment.store_root(store)
    environment.configure(root)
    try:
        folders = stage_folders(p, root)
    except LookupError as exc:
        console.print(f"[bold red]{exc}[/]; run `mammo run -p {params} --until hashing` first")
        raise typer.Exit(1) from None
    patch = patches.PatchSettings(size=p.patches.size, context=p.patches.context, min_size_px=p.patches.min_size_px,
                                  intensity=p.patches.intensity)
    try:
        pixels, parsed_box = check_query(read_query_image(image), parsed_box)  # before the model loads
        index = load_index(folders["train"], folders["features"], folders["hashing"], decoder, bits, patch=patch,
                           cache_max_side=p.curate.max_side)
        results = index.query(pixels, parsed_box, k)
    except BadItem as exc:
        console.print(f"[bold red]cannot read the image:[/] {exc.reason}")
        raise typer.Exit(1) from None
    except ValueError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    if json_out:
        print(json.dumps({"decoder": decoder, "bits": bits, "k": k, "box": list(parsed_box) if parsed_box else None,
                          "database_size": len(index), "results": results}))
    else:
        Console().print(_table(results, decoder, bits, len(index)))
