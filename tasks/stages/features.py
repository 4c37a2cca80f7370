"""features: per-branch and fused features for every patch, with fusion weights chosen on validation."""

from __future__ import annotations

from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime
from tasks.stages import train
from tasks.stages.patches import FILE as PATCHES_FILE

FILES = stage_files.FEATURES  # this stage's output files

FILE = FILES.features
SPLITS = train.SPLIT_CODES


def _grid_figure(table, best, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    sc = ax.scatter(table["w_freeze1"], table["w_freeze2"], c=table["val_acc"], cmap="viridis", s=60)
    ax.scatter([best[0]], [best[1]], marker="x", color="red", s=80, label=f"chosen {best}")
    ax.set_xlabel("weight freeze1")
    ax.set_ylabel("weight freeze2 (freeze3 = 1 - both)")
    ax.set_title("Fusion weights: validation accuracy of a linear probe")
    fig.colorbar(sc, label="val accuracy")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _run(ctx: runtime.StageContext) -> None:
    from mammo_core.codes import features, fusion
    from mammo_core.storage import h5io

    p = ctx.params.features
    trained = ctx.upstream["train"]
    fused_model, _ = train.load_trained(trained.path)
    out = ctx.workdir / FILE
    device = "cuda" if ctx.params.run.device != "cpu" and runtime.cuda_available() else "cpu"
    n = features.export_features(fused_model, ctx.upstream["patches"].file(PATCHES_FILE), out,
                                 model_key=trained.key, batch_size=p.batch_size, device=device)
    by_split = {name: features.read_branch_features(out, code) for name, code in SPLITS.items()}
    if p.fusion_weights == "search":
        search = fusion.search_weights(by_split["train"], by_split["val"], step=p.grid_step, seed=p.probe_seed)
        weights = search.weights
        search.table.to_csv(ctx.workdir / FILES.fusion_grid, index=False)
        _grid_figure(search.table, weights, ctx.workdir / "fusion_grid.png")
        ctx.log_artifact(ctx.workdir / "fusion_grid.png", "figures")
        ctx.log_artifact(ctx.workdir / FILES.fusion_grid)
    else:
        weights = fusion.check_weights(p.fusion_weights)
    features.add_fused(out, weights)
    for data in by_split.values():  # the same vectors add_fused just wrote, without reading them back
        data["fused"] = features.fuse(data, weights)
    metrics: dict[str, float] = {"features/rows": n}
    for name in (*features.BRANCH_DATASETS, "fused"):
        acc = fusion.probe_accuracy(
            by_split["train"][name], by_split["train"]["labels"],
            {s: (by_split[s][name], by_split[s]["labels"]) for s in ("val", "test")}, seed=p.probe_seed)
        metrics[f"features/{name}/val_acc"] = acc["val"]
        metrics[f"features/{name}/test_acc"] = acc["test"]
    for b, w in zip(features.BRANCH_DATASETS, weights, strict=True):
        metrics[f"features/weight/{b}"] = w
    ctx.log_metrics(metrics)
    write_json_atomic(ctx.workdir / FILES.fusion, {"weights": list(weights), "mode": "search"
                      if p.fusion_weights == "search" else "params", "model_key": trained.key,
                      "attrs": h5io.read_attrs(out)})


SPEC = runtime.StageSpec(
    name="features",
    upstream=("train", "patches"),
    sections=("features",),
    run=_run,
)
