"""patches: ROI-centred and NORMAL patches from the curated cache into ``patches.h5``."""

from __future__ import annotations

from mammo_core import patches
from mammo_core.store import write_json_atomic
from tasks import runtime

FILE = "patches.h5"


def _run(ctx: runtime.StageContext) -> None:
    p = ctx.params.patches
    curate_dir = ctx.upstream["curate"].path
    summary = patches.extract_patches(
        curate_dir,
        ctx.workdir / FILE,
        size=p.size,
        context=p.context,
        min_size_px=p.min_size_px,
        normals_per_image=p.normals_per_image,
        seed=p.seed,
        intensity=p.intensity,
        workers=p.workers,
    )
    if summary.n_patches == 0:
        raise RuntimeError(f"no patch could be extracted from {curate_dir}; skipped: {summary.skipped[:5]}")
    write_json_atomic(
        ctx.workdir / "patches_summary.json",
        {"counts": summary.counts, "skipped": [{"item": i, "reason": r} for i, r in summary.skipped],
         "normals_without_spot": summary.normals_without_spot, "class_names": list(summary.class_names)},
    )
    ctx.log_metrics({f"patches/{k}": v for k, v in summary.metrics().items()})
    ctx.log_artifact(ctx.workdir / "patches_summary.json")
    ctx.log_dataset(ctx.workdir / FILE, "patches", "patches")


SPEC = runtime.StageSpec(
    name="patches",
    upstream=("curate",),
    sections=("patches",),
    run=_run,
)
