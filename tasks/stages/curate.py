"""curate: tables, patient splits and the preprocessed image cache (mammo_core.data.curation)."""

from __future__ import annotations

from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime
from tasks.stages import acquire

FILES = stage_files.CURATE  # this stage's output files


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.data import curation

    root, layout = acquire.raw_root(ctx.upstream["acquire"])
    p = ctx.params
    settings = curation.CurationSettings(
        classes=p.task.classes,
        max_side=p.curate.max_side,
        val_fraction=p.curate.val_fraction,
        split_seed=p.curate.split_seed,
        workers=p.curate.workers,
        min_box_area=p.curate.min_box_area,
        mask_aspect_tolerance=p.curate.mask_aspect_tolerance,
        max_image_bytes=p.curate.max_image_mb * 2**20,
        image_time_limit_s=p.curate.image_time_limit_s,
        allow_burned_in_annotation=p.curate.allow_burned_in_annotation,
    )
    last = {"pct": -1}

    def progress(done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if pct // 10 != last["pct"] // 10 or done == total:
            ctx.logger.info("curate: %d/%d images decoded", done, total)
            last["pct"] = pct

    result = curation.curate(root, layout, ctx.workdir / "cache", settings, progress=progress)
    result.images.to_parquet(ctx.workdir / FILES.images, index=False)
    result.lesions.to_parquet(ctx.workdir / FILES.lesions, index=False)
    result.quarantine.to_parquet(ctx.workdir / FILES.quarantine, index=False)
    write_json_atomic(ctx.workdir / FILES.report, result.report)
    report = result.report
    metrics = {
        "curate/images": report["images"],
        "curate/lesions": report["lesions"],
        "curate/patients": report["patients"],
        "curate/quarantined": report["quarantined"],
    }
    for split, n in report["images_per_split"].items():
        metrics[f"curate/images_{split}"] = n
    for split, per_class in report["lesions_per_class_and_split"].items():
        for name, n in per_class.items():
            metrics[f"curate/lesions_{split}/{name.lower()}"] = n
    ctx.log_metrics(metrics)
    ctx.log_artifact(ctx.workdir / FILES.report)
    ctx.log_dataset(ctx.workdir / FILES.images, "images", "curated")
    ctx.log_dataset(ctx.workdir / FILES.lesions, "lesions", "curated")


SPEC = runtime.StageSpec(
    name="curate",
    upstream=("acquire",),
    sections=("task", "curate"),
    run=_run,
)
