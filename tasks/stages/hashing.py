"""hashing: the divide-and-encode hash decoder and its FC ablation at each code length, retrieval MAP.

Both decoders are trained on the fused training features with the identical objective and budget, once per
seed of ``hashing.seeds`` (same seed for both: a paired comparison); ``table4_map_by_seed.csv`` has every
seed's MAP, ``table4_map.csv`` the mean, spread and paired hash - FC difference per code length. The first
seed's codes of every split are stored packed in ``codes.h5`` (and its decoders in ``decoders/``) for the
downstream stages; the test queries are ranked against the training database by Hamming distance (ties by
index), MAP over the whole ranking. The same is done on Freeze3's features alone (the paper's single
DenseNet, :data:`SINGLE`), written beside the fused results with a ``_freeze3`` suffix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from mammo_core.storage import stage_files
from mammo_core.storage.store import write_json_atomic
from tasks import runtime
from tasks.stages.features import FILE as FEATURES_FILE
from tasks.stages.features import SPLITS
from tasks.stages.patches import FILE as PATCHES_FILE

if TYPE_CHECKING:
    import h5py

    from mammo_core.models.hashing import FCDecoder, HashDecoder

FILES = stage_files.HASHING  # this stage's output files

CODES_FILE = FILES.codes
DECODERS = ("hash", "fc")
# The paper's Tables 4 and 5 use a single DenseNet; the same decoders are also trained on Freeze3's features
# alone (same seeds, objective and budget), kept apart from the fused ones: codes under ``freeze3/`` in
# codes.h5, ``*_freeze3.csv`` tables, ``hashing/freeze3/...`` metrics.
SINGLE = "freeze3"


def training_seeds(p) -> list[int]:
    """The seeds every decoder is trained with: ``hashing.seed``, ``+1``, ... (``hashing.seeds`` of them)."""
    return [p.seed + k for k in range(p.seeds)]


def train_all(p, by_split: dict, sources: tuple[str, ...]) -> dict[tuple[str, str, int, int], object]:
    """Every decoder of the stage - (source, kind, q, seed) for each source, decoder kind, code length and
    seed - trained on its source's training features, all together (:mod:`mammo_core.models.hashing_stack`: the
    same training problem per decoder as :func:`mammo_core.models.hashing.train_decoder`, one optimiser step for all).
    """
    from mammo_core.models import hashing, hashing_stack

    jobs: dict[tuple[str, str, int, int], hashing_stack.DecoderJob] = {}
    for source in sources:
        features_train = by_split["train"][source]
        for q in p.bits:
            for seed in training_seeds(p):
                for kind in DECODERS:
                    decoder = hashing.build_decoder(kind, features_train.shape[1], q, p.beta, p.eps, seed)
                    jobs[(source, kind, q, seed)] = hashing_stack.DecoderJob(decoder, features_train, seed)
    hashing_stack.train_decoders(
        list(jobs.values()), by_split["train"]["labels"], objective=p.objective, epochs=p.epochs,
        batch_size=p.batch_size, lr=p.lr, margin=p.margin, quantization_weight=p.quantization_weight,
        every_epoch_diagnostics=False,
    )
    return {key: job.decoder for key, job in jobs.items()}


def _evaluate(decoder, by_split: dict, source: str) -> tuple[dict, dict]:
    """A trained decoder's packed codes per split and its test retrieval scores (test vs train database)."""
    from mammo_core.codes import retrieval

    packed = {split: retrieval.pack_codes(decoder.encode(data[source])) for split, data in by_split.items()}
    args = (packed["test"], by_split["test"]["labels"], packed["train"], by_split["train"]["labels"])
    scores = {"map": retrieval.mean_average_precision(*args),
              "p@10": retrieval.precision_at_k(*args, k=min(10, len(packed["train"])))}
    return packed, scores


def _run(ctx: runtime.StageContext) -> None:
    import h5py
    import pandas as pd

    from mammo_core.codes import features, retrieval
    from mammo_core.evaluation import figures, seed_summary
    from mammo_core.storage import h5io
    from mammo_core.training import checkpoint

    p = ctx.params.hashing
    feats_path = ctx.upstream["features"].file(FEATURES_FILE)
    attrs = h5io.read_attrs(feats_path)
    by_split = {name: features.read_branch_features(feats_path, code) for name, code in SPLITS.items()}
    if len(by_split["train"]["labels"]) == 0:
        raise ValueError(f"{feats_path}: the training split is empty, there is no database to search")
    class_names = list(h5io.read_attrs(ctx.upstream["patches"].file(PATCHES_FILE))["class_names"])
    in_dim = by_split["train"]["fused"].shape[1]
    seeds = training_seeds(p)
    seed_rows, metrics, bit_rows = [], {}, []
    trained = train_all(p, by_split, ("fused", SINGLE))
    (ctx.workdir / "decoders").mkdir()
    with h5py.File(ctx.workdir / CODES_FILE, "w") as out:
        out.attrs["class_names"] = json.dumps(class_names)
        out.attrs["features_model_key"] = json.dumps(attrs.get("model_key"))
        out.attrs["seed"] = seeds[0]
        for split, data in by_split.items():
            out.create_dataset(f"labels/{split}", data=data["labels"])
            out.create_dataset(f"patient_id/{split}", data=data["patient_id"])
            out.create_dataset(f"source_id/{split}", data=data["source_id"])
        single_rows = _single_rows(ctx, p, seeds, by_split, out, metrics, trained)
        for q in p.bits:
            for seed in seeds:
                row = {"bits": q, "seed": seed}
                for kind in DECODERS:
                    decoder = trained[("fused", kind, q, seed)]
                    packed, scores = _evaluate(decoder, by_split, "fused")
                    row[f"{kind}_map"], row[f"{kind}_p@10"] = scores["map"], scores["p@10"]
                    metrics[f"hashing/seed_{seed}/{kind}/map_at_{q}"] = scores["map"]
                    if seed != seeds[0]:
                        continue
                    # The first seed's decoders and codes are the ones downstream stages and serving use.
                    checkpoint.save_atomic(decoder.state_dict(), ctx.workdir / "decoders" / f"{kind}_{q}.pt")
                    for split, codes in packed.items():
                        out.create_dataset(f"{kind}/{q}/{split}", data=codes)
                    stats = retrieval.bit_statistics(decoder.relaxed_numpy(by_split["test"]["fused"]), eps=p.eps)
                    for stat, value in stats.as_metrics().items():
                        metrics[f"hashing/{kind}/{stat}_at_{q}"] = value
                    bit_rows.append({"decoder": kind, "bits": q, "seed": seed, **stats.as_metrics()})
                seed_rows.append(row)
    by_seed = pd.DataFrame(seed_rows)
    by_seed["hash_minus_fc_map"] = by_seed["hash_map"] - by_seed["fc_map"]
    table = seed_summary.paired_seed_summary(by_seed, "bits", "hash_map", "fc_map",
                                             extra_means=("hash_p@10", "fc_p@10"))
    for r in table.to_dict("records"):
        q = int(r["bits"])
        for kind in DECODERS:
            metrics[f"hashing/{kind}/map_at_{q}"] = r[f"{kind}_map"]
            metrics[f"hashing/{kind}/precision_at_10_{q}"] = r[f"{kind}_p@10"]
            if r["n_seeds"] > 1:
                metrics[f"hashing/{kind}/map_std_at_{q}"] = r[f"{kind}_map_std"]
        metrics[f"hashing/hash_minus_fc/map_at_{q}"] = r["hash_map_minus_fc_map"]
        if r["n_seeds"] > 1:
            metrics[f"hashing/hash_minus_fc/map_std_at_{q}"] = r["hash_map_minus_fc_map_std"]
    table.to_csv(ctx.workdir / FILES.map_table, index=False)
    by_seed.to_csv(ctx.workdir / FILES.map_by_seed, index=False)
    single_by_seed = pd.DataFrame(single_rows)
    single_by_seed["hash_minus_fc_map"] = single_by_seed["hash_map"] - single_by_seed["fc_map"]
    seed_summary.paired_seed_summary(single_by_seed, "bits", "hash_map", "fc_map",
                                     extra_means=("hash_p@10", "fc_p@10")).to_csv(
        ctx.workdir / f"table4_map_{SINGLE}.csv", index=False)
    single_by_seed.to_csv(ctx.workdir / f"table4_map_by_seed_{SINGLE}.csv", index=False)
    pd.DataFrame(bit_rows).to_csv(ctx.workdir / FILES.bit_statistics, index=False)
    write_json_atomic(ctx.workdir / FILES.summary, {"bits": list(p.bits), "in_dim": in_dim, "beta": p.beta,
                                                     "eps": p.eps, "class_names": class_names,
                                                     "seeds": seeds, "decoders_seed": seeds[0]})
    curves = {kind: list(table[f"{kind}_map"]) for kind in DECODERS}
    fig = figures.series_figure({f"{k} decoder": v for k, v in curves.items()}, [int(b) for b in table["bits"]],
                                f"Retrieval MAP by code length (test vs train), mean of {len(seeds)} seed(s)",
                                ctx.workdir / "table4_map.png", xlabel="bits", ylabel="MAP")
    ctx.log_metrics(metrics)
    for name in (FILES.map_table, FILES.map_by_seed, FILES.bit_statistics, f"table4_map_{SINGLE}.csv"):
        ctx.log_artifact(ctx.workdir / name, "tables")
    ctx.log_artifact(fig, "figures")
    ctx.logger.info("hashing: mean MAP over seeds %s, hash-FC %s", seeds,
                    {int(r["bits"]): (round(r["hash_map"], 3), round(r["fc_map"], 3),
                                      round(r["hash_map_minus_fc_map"], 3)) for r in table.to_dict("records")})


def _single_rows(ctx: runtime.StageContext, p, seeds: list[int], by_split: dict, out: h5py.File,
                 metrics: dict[str, float], trained: dict) -> list[dict]:
    """Both decoders on Freeze3's features alone, per code length and seed; first seed's codes into ``out``."""
    rows = []
    for q in p.bits:
        for seed in seeds:
            row = {"bits": q, "seed": seed}
            for kind in DECODERS:
                packed, scores = _evaluate(trained[(SINGLE, kind, q, seed)], by_split, SINGLE)
                row[f"{kind}_map"], row[f"{kind}_p@10"] = scores["map"], scores["p@10"]
                metrics[f"hashing/{SINGLE}/seed_{seed}/{kind}/map_at_{q}"] = scores["map"]
                if seed == seeds[0]:
                    for split, codes in packed.items():
                        out.create_dataset(f"{SINGLE}/{kind}/{q}/{split}", data=codes)
            rows.append(row)
    first = {r["bits"]: (round(r["hash_map"], 3), round(r["fc_map"], 3)) for r in rows if r["seed"] == seeds[0]}
    ctx.logger.info("hashing: single %s features, first-seed MAP hash/FC %s", SINGLE, first)
    return rows


def load_decoder(stage_path: str | Path, kind: str, q: int) -> HashDecoder | FCDecoder:
    """A trained decoder of a finished hashing stage (weights_only load)."""
    import torch

    from mammo_core.models import hashing

    config = json.loads((Path(stage_path) / FILES.summary).read_text(encoding="utf-8"))
    decoder = hashing.build_decoder(kind, config["in_dim"], q, config["beta"], config["eps"], 0)
    decoder.load_state_dict(torch.load(Path(stage_path) / "decoders" / f"{kind}_{q}.pt", weights_only=True))
    return decoder.eval()


SPEC = runtime.StageSpec(
    name="hashing",
    upstream=("features", "patches"),
    sections=("hashing",),
    run=_run,
)
