"""augment: the paper's augmentation policy as seeded copies of the training patches."""

from __future__ import annotations

from mammo_core.storage import stage_files
from tasks import runtime
from tasks.stages.patches import FILE as PATCHES_FILE

FILES = stage_files.AUGMENT  # this stage's output files

FILE = FILES.augmented
PREVIEW = FILES.preview


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.data import augment

    p = ctx.params.augment
    summary = augment.augment_split(
        ctx.upstream["patches"].file(PATCHES_FILE), ctx.workdir / FILE, copies=p.copies, seed=p.seed, batch=p.batch
    )
    augment.preview_grid(ctx.workdir / FILE, ctx.workdir / PREVIEW)
    metrics = {"augment/originals": summary.originals, "augment/rows": summary.rows}
    metrics.update({f"augment/rows/{name}": n for name, n in summary.per_class.items()})
    ctx.log_metrics(metrics)
    ctx.log_artifact(ctx.workdir / PREVIEW)
    ctx.log_dataset(ctx.workdir / FILE, "train_augmented", "training")


SPEC = runtime.StageSpec(
    name="augment",
    upstream=("patches",),
    sections=("augment",),
    run=_run,
)
