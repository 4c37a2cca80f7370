"""patches: ROI-centred and NORMAL patches from the curated cache into ``patches.h5``.

Beside them, ``shortcut_probe.json``: whether content-blind statistics of the patches (padding, black
pixels, intensity, crop side) predict lesion vs NORMAL or the task's classes (mammo_core.evaluation.shortcut_probe).
It is computed here because this stage decides how patches are cut; the report prints it beside the CNNs.
"""

from __future__ import annotations

from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime

FILES = stage_files.PATCHES  # this stage's output files

FILE = FILES.patches
PROBE = FILES.shortcut_probe
PROBE_BOOT = 1000  # bootstrap resamples of the probe's intervals (cheap: a few thousand test rows at most)


def probe_metrics(probe: dict) -> dict[str, float]:
    """Flat numbers of the shortcut probe for tracking: accuracy per target, feature set and model, padding
    per kind ('+' is not allowed in an MLflow metric name: cut+intensity is logged as cut_intensity)."""
    out = {}
    for row in probe["rows"]:
        features = str(row.get("features", "")).replace("+", "_")
        for key in ("test_acc", "balanced_acc"):
            if row.get(key) is not None:
                out[f"patches/probe/{row['target']}/{features}/{row['model']}/{key}"] = float(row[key])
    for kind, per_split in probe["padding"].items():
        share = per_split["all"]["share_over_5pct"]
        if share is not None:
            out[f"patches/padded_over_5pct/{kind}"] = float(share)
    return out


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.data import patches
    from mammo_core.evaluation import shortcut_probe

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
        ctx.workdir / FILES.summary,
        {"counts": summary.counts, "skipped": [{"item": i, "reason": r} for i, r in summary.skipped],
         "normals_without_spot": summary.normals_without_spot, "class_names": list(summary.class_names)},
    )
    probe = shortcut_probe.probe_patches_file(ctx.workdir / FILE, summary.class_names, PROBE_BOOT, p.seed)
    write_json_atomic(ctx.workdir / PROBE, probe)
    ctx.log_metrics({f"patches/{k}": v for k, v in summary.metrics().items()})
    ctx.log_metrics(probe_metrics(probe))
    ctx.log_artifact(ctx.workdir / FILES.summary)
    ctx.log_artifact(ctx.workdir / PROBE)
    ctx.log_dataset(ctx.workdir / FILE, "patches", "patches")


SPEC = runtime.StageSpec(
    name="patches",
    upstream=("curate",),
    sections=("patches",),
    run=_run,
)
