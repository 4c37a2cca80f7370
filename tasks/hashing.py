"""hashing: the divide-and-encode hash decoder and its FC ablation at each code length, retrieval MAP.

Both decoders are trained on the fused training features with the identical objective and budget; the
codes of every split are stored packed in ``codes.h5`` and the test queries are ranked against the
training database by Hamming distance (ties by index), MAP over the whole ranking.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pandas as pd
import torch

from mammo_core import checkpoint, features, figures, h5io, hashing, retrieval
from mammo_core.store import write_json_atomic
from tasks import runtime
from tasks.features import FILE as FEATURES_FILE
from tasks.features import SPLITS
from tasks.patches import FILE as PATCHES_FILE

CODES_FILE = "codes.h5"
DECODERS = ("hash", "fc")


def build_decoder(kind: str, in_dim: int, q: int, beta: float, eps: float, seed: int):
    if kind == "hash":
        return hashing.HashDecoder(in_dim, q, beta=beta, eps=eps, seed=seed)
    return hashing.FCDecoder(in_dim, q, seed=seed)


def _run(ctx: runtime.StageContext) -> None:
    p = ctx.params.hashing
    feats_path = ctx.upstream["features"].file(FEATURES_FILE)
    attrs = h5io.read_attrs(feats_path)
    by_split = {name: features.read_branch_features(feats_path, code) for name, code in SPLITS.items()}
    if len(by_split["train"]["labels"]) == 0:
        raise ValueError(f"{feats_path}: the training split is empty, there is no database to search")
    class_names = list(h5io.read_attrs(ctx.upstream["patches"].file(PATCHES_FILE))["class_names"])
    in_dim = by_split["train"]["fused"].shape[1]
    table, metrics, bit_rows = [], {}, []
    (ctx.workdir / "decoders").mkdir()
    with h5py.File(ctx.workdir / CODES_FILE, "w") as out:
        out.attrs["class_names"] = json.dumps(class_names)
        out.attrs["features_model_key"] = json.dumps(attrs.get("model_key"))
        for split, data in by_split.items():
            out.create_dataset(f"labels/{split}", data=data["labels"])
            out.create_dataset(f"patient_id/{split}", data=data["patient_id"])
            out.create_dataset(f"source_id/{split}", data=data["source_id"])
        for q in p.bits:
            row = {"bits": q}
            for kind in DECODERS:
                decoder = build_decoder(kind, in_dim, q, p.beta, p.eps, p.seed)
                hashing.train_decoder(
                    decoder, by_split["train"]["fused"], by_split["train"]["labels"], objective=p.objective,
                    epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, margin=p.margin,
                    quantization_weight=p.quantization_weight, seed=p.seed,
                )
                checkpoint.save_atomic(decoder.state_dict(), ctx.workdir / "decoders" / f"{kind}_{q}.pt")
                packed = {}
                for split, data in by_split.items():
                    packed[split] = retrieval.pack_codes(decoder.encode(data["fused"]))
                    out.create_dataset(f"{kind}/{q}/{split}", data=packed[split])
                args = (packed["test"], by_split["test"]["labels"], packed["train"], by_split["train"]["labels"])
                m = retrieval.mean_average_precision(*args)
                p10 = retrieval.precision_at_k(*args, k=min(10, len(packed["train"])))
                stats = retrieval.bit_statistics(decoder.relaxed_numpy(by_split["test"]["fused"]), eps=p.eps)
                row[f"{kind}_map"] = m
                row[f"{kind}_p@10"] = p10
                metrics[f"hashing/{kind}/map_at_{q}"] = m
                metrics[f"hashing/{kind}/precision_at_10_{q}"] = p10
                for stat, value in stats.as_metrics().items():
                    metrics[f"hashing/{kind}/{stat}_at_{q}"] = value
                bit_rows.append({"decoder": kind, "bits": q, **stats.as_metrics()})
            table.append(row)
    pd.DataFrame(table).to_csv(ctx.workdir / "table4_map.csv", index=False)
    pd.DataFrame(bit_rows).to_csv(ctx.workdir / "bit_statistics.csv", index=False)
    write_json_atomic(ctx.workdir / "hashing.json", {"bits": list(p.bits), "in_dim": in_dim, "beta": p.beta,
                                                     "eps": p.eps, "class_names": class_names})
    curves = {kind: [r[f"{kind}_map"] for r in table] for kind in DECODERS}
    fig = figures.series_figure({f"{k} decoder": v for k, v in curves.items()}, [r["bits"] for r in table],
                                "Retrieval MAP by code length (test vs train)", ctx.workdir / "table4_map.png",
                                xlabel="bits", ylabel="MAP")
    ctx.log_metrics(metrics)
    for name in ("table4_map.csv", "bit_statistics.csv"):
        ctx.log_artifact(ctx.workdir / name, "tables")
    ctx.log_artifact(fig, "figures")
    ctx.logger.info("hashing: MAP %s", {r["bits"]: (round(r["hash_map"], 3), round(r["fc_map"], 3)) for r in table})


def load_decoder(stage_path: str | Path, kind: str, q: int) -> hashing.HashDecoder | hashing.FCDecoder:
    """A trained decoder of a finished hashing stage (weights_only load)."""
    config = json.loads((Path(stage_path) / "hashing.json").read_text(encoding="utf-8"))
    decoder = build_decoder(kind, config["in_dim"], q, config["beta"], config["eps"], 0)
    decoder.load_state_dict(torch.load(Path(stage_path) / "decoders" / f"{kind}_{q}.pt", weights_only=True))
    return decoder.eval()


SPEC = runtime.StageSpec(
    name="hashing",
    upstream=("features", "patches"),
    sections=("hashing",),
    run=_run,
)
