"""acquire: put a raw CBIS-DDSM-shaped dataset somewhere curate can read it, and inventory it.

``phantom`` generates the twin inside the stage folder (it is small and fully determined by the key);
``cbis-local``/``cbis-jpeg`` record a pointer to the user's copy; ``cbis-tcia`` downloads into
``data.root`` (default ``<store>/data/CBIS-DDSM``), outside the stage folder, so an interrupted download
resumes from the series already finished instead of starting again under a new key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mammo_core.config import DataParams, Params
from mammo_core.storage import stage_files
from mammo_core.storage.data_fingerprint import data_fingerprint
from mammo_core.storage.store import write_json_atomic
from tasks import runtime

if TYPE_CHECKING:
    from mammo_core.sources import tcia

SOURCE_FILE = stage_files.ACQUIRE.source


def raw_root(result: runtime.StageResult) -> tuple[Path, str]:
    """(dataset root, layout) recorded by a finished acquire stage."""
    source = json.loads(result.file(SOURCE_FILE).read_text(encoding="utf-8"))
    root = Path(source["root"])
    if not root.is_absolute():
        root = Path(result.path) / root
    return root, source["layout"]


def download(data: DataParams, root: Path, **options: Any) -> tcia.DownloadSummary:
    """Download (or finish downloading) the selected series into ``root``; raises
    :class:`mammo_core.sources.tcia.IncompleteDownload` naming the series that failed, so that acquire is never
    sealed over a dataset with holes and the next run retries them. ``options``: timeouts, retries."""
    from mammo_core.sources import tcia

    summary = tcia.download_collection(
        root, collection=data.collection, base_url=data.base_url, limit=data.limit,
        workers=data.download_workers, **options,
    )
    summary.raise_if_incomplete(root)
    return summary


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.data import layouts
    from mammo_core.sources import phantom

    data = ctx.params.data
    if data.source == "phantom":
        root = ctx.workdir / "raw"
        summary = phantom.generate_phantom(
            root, n_patients=data.n_patients, seed=data.seed, image_shape=tuple(data.image_shape)
        )
        recorded_root = "raw"  # relative: the stage folder is renamed after writing
        ctx.log_metrics({"acquire/patients": summary.patients, "acquire/images": summary.images})
    elif data.source == "cbis-tcia":
        root = Path(data.root) if data.root else ctx.store_root / "data" / "CBIS-DDSM"
        root = root.resolve()
        summary = download(data, root)
        ctx.log_metrics(
            {
                "acquire/series_downloaded": len(summary.downloaded),
                "acquire/series_skipped": len(summary.skipped),
            }
        )
        recorded_root = str(root)
    else:
        root = Path(data.root).expanduser().resolve()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} does not exist (data.source={data.source})")
        recorded_root = str(root)
    layout = layouts.detect_layout(root)
    if data.source == "cbis-jpeg" and layout != "jpeg":
        raise ValueError(f"data.source is cbis-jpeg but {root} looks like the {layout} layout")
    inventory = layouts.build_inventory(root)
    inventory.to_parquet(ctx.workdir / "inventory.parquet", index=False)
    write_json_atomic(ctx.workdir / SOURCE_FILE, {"root": recorded_root, "layout": layout, "source": data.source})
    ctx.log_metrics({"acquire/files": len(inventory), "acquire/bytes": float(inventory["size"].sum())})
    ctx.set_tags({"data.source": data.source, "data.layout": layout})


def key_inputs(params: Params) -> dict[str, Any]:
    """The user's data folder enters the key (``cbis-local``/``cbis-jpeg``): a changed file re-runs acquire.

    ``phantom`` is fully determined by params and code; ``cbis-tcia`` is only sealed once every selected
    series is downloaded and verified, so its folder's state at key time decides nothing.
    """
    data = params.data
    if data.source in ("cbis-local", "cbis-jpeg") and data.root:
        return {"data": data_fingerprint(data.root)}
    return {}


SPEC = runtime.StageSpec(
    name="acquire",
    upstream=(),
    sections=("data",),
    run=_run,
    key_inputs=key_inputs,
)
