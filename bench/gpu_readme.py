"""The README's "GPU figures" section, written from the GPU checks' output (never by hand).

``bench/gpu_device.sh`` writes one JSON line per check (``machine``, ``cuda_tests``, ``detect``,
``gpu_pipeline_shared``, ``gpu_pipeline_separate``); the GPU calls' lines are kept in
``bench/results/gpu.jsonl``. This script renders them as markdown and puts it between the README's two
``gpu-figures`` markers. ``--check`` fails
when the README's section differs from what the results render to (a test runs it), so a figure in that
section is always one the bench printed.

Usage: python bench/gpu_readme.py [--results bench/results/gpu.jsonl] [--readme README.md] [--check]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gpu.jsonl"
BEGIN = "<!-- gpu-figures: written by `python bench/gpu_readme.py` from bench/results/gpu.jsonl; do not edit -->"
END = "<!-- /gpu-figures -->"
DETECTORS = (("ours", "ours"), ("ours_nohash", "ours without hash"), ("frcnn_r50", "ResNet-50 FPN"))
VARIANTS = (("", "as built"), ("_inference", "inference copy"), ("_graphed", "inference copy, CUDA-graphed backbone"))


def read_results(path: Path) -> dict[str, dict]:
    """The last line of each bench in a JSON-lines file (a rerun of one check replaces its figures).

    Each GPU call writes a ``machine`` line first: the lines after it inherit its ``commit`` and ``date``
    (unless they carry their own), so that checks run in different calls each name the version they measured.
    A ``gpu_pipeline`` line of the older form (both runs in one line) is read as its two runs.
    """
    out: dict[str, dict] = {}
    machine: dict = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not a JSON line ({exc})") from exc
        if row["bench"] == "machine":
            machine = row
        rows = [row]
        if row["bench"] == "gpu_pipeline":  # the older form: {"shared": {...}, "separate": {...}}
            common = {k: v for k, v in row.items() if k not in ("bench", "shared", "separate")}
            rows = [{"bench": f"gpu_pipeline_{run}", **common, **row[run]} for run in ("shared", "separate")
                    if row.get(run)]
        for r in rows:
            out[r["bench"]] = {"commit": machine.get("commit", "?"), "date": machine.get("date", "?"), **r}
    return out


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _machine(m: dict | None) -> list[str]:
    if not m:
        return ["No `machine` line: the GPU checks have not been run for this version."]
    return [f"Measured on one {m['gpu']} ({m['cpu_cores']} CPU cores), torch {m['torch']}, CUDA {m['cuda']}, "
            f"cuDNN {m['cudnn']}, Python {m['python']}, by `bash bench/gpu_device.sh OUT` (the wheels of the "
            "project's packages on `PYTHONPATH`); each check below names the commit and day it measured."]


def _when(row: dict) -> str:
    return f"commit {row.get('commit', '?')}, {row.get('date', '?')}"


def _detect(d: dict | None) -> list[str]:
    if not d:
        return ["**Detector latency:** no `detect` line (the bench did not finish)."]
    lat = d["latency_ms"]
    h, w = d["input_hw"]
    lines = [f"**Detector latency at batch 1** (`python bench/detect.py {' '.join(d['argv'])}`; {_when(d)}): "
             f"input {h} x {w}, "
             f"median of {d['repeats']} interleaved rounds after warm-up, random weights shaped as trained, "
             f"cuDNN autotuner {'on' if d.get('cudnn_benchmark') else 'off'} for every model alike. Milliseconds:",
             "", "| detector | " + " | ".join(label for _, label in VARIANTS) + " |",
             "|---|" + "---:|" * len(VARIANTS)]
    for key, label in DETECTORS:
        lines.append(f"| {label} | " + " | ".join(_ms(lat.get(key + suffix)) for suffix, _ in VARIANTS) + " |")
    ratios = []
    for suffix, _ in VARIANTS:
        a, b = lat.get("ours" + suffix), lat.get("frcnn_r50" + suffix)
        ratios.append(f"**{a / b:.2f}**" if a and b else "-")
    lines.append("| ours / ResNet-50 | " + " | ".join(ratios) + " |")
    diffs = d.get("graphed_max_score_diff") or {}
    if diffs:
        shown = ", ".join(f"{label} {diffs.get(key)}" for key, label in DETECTORS)
        lines += ["", f"Largest score difference of the graphed copy against the model as built: {shown} "
                  "(None: a different number of boxes)."]
    lines += ["", f"The paper claims {d['paper_claim_ms']['ours']} ms for ours against "
              f"{d['paper_claim_ms']['faster_rcnn']} ms for its Faster R-CNN, on its own GPU and input."]
    return lines


def _ended(run: dict) -> str:
    """How a ``mammo run`` of the bench ended, in words."""
    code = run["exit_code"]
    if code == "timed out":
        return f"stopped by the bench's time limit after {run['wall_s']:.0f} s (SIGINT to its process group, as Ctrl-C)"
    return f"{'finished' if code == 0 else f'exit code {code}'} in {run['wall_s']:.0f} s"


def _pipeline(shared: dict | None, sep: dict | None) -> list[str]:
    if not shared:
        lines = ["**Pipeline on the GPU:** no `gpu_pipeline_shared` line (the bench did not finish)."]
    else:
        lines = [f"**The whole pipeline on the GPU** (`{shared['command']}`; {_when(shared)}; sizes of "
                 "`params/paper.yaml`, the phantom, few epochs and random init: it checks the CUDA path, its "
                 f"accuracy figures mean nothing): {_ended(shared)}, Prefect server and MLflow included. Seconds of "
                 "each stage it sealed, from the stage folder's manifest:", "",
                 "| " + " | ".join(shared["stage_seconds"]) + " |", "|" + "---:|" * len(shared["stage_seconds"]),
                 "| " + " | ".join(f"{s:.1f}" for s in shared["stage_seconds"].values()) + " |"]
        if shared.get("train_epoch_seconds"):
            lines += ["", "Shared-trunk training epochs (all three branches, validation included), seconds: "
                      + ", ".join(f"{s:.1f}" for s in shared["train_epoch_seconds"]) + "."]
        det = shared.get("detect")
        if det:
            lat = det["latency_ms"]
            lines += ["", f"The detect stage on {det['device']} timed its trained detectors ({det['latency_models']}) "
                      f"at {det['input_hw'][0]} x {det['input_hw'][1]}: "
                      + ", ".join(f"{label} {_ms(lat.get(key))} ms" for key, label in DETECTORS if key in lat)
                      + (f"; ours / ResNet-50 **{det['latency_ratio_vs_r50']:.2f}**."
                         if det.get("latency_ratio_vs_r50") else ".")]
    if sep:
        tasks = sep.get("branch_tasks") or {}
        train_shared = (shared or {}).get("stage_seconds", {}).get("train")
        each = "; ".join(f"{name} {t['state']} in {_ms(t['seconds'])} s on {t['device']} (slot {t['gpu_slot']})"
                         + (f", epochs {', '.join(f'{s:.1f}' for s in t['epoch_seconds'])} s"
                            if t.get("epoch_seconds") else "")
                         for name, t in tasks.items())
        lines += ["", f"**Freeze1-3 as three tasks on one GPU** (`{sep['command']}`; {_when(sep)}): {_ended(sep)}. "
                  f"From the Prefect server's database: {each or 'no branch tasks'}. "
                  + (f"All three were running at once for {sep['overlap_s']:.1f} s. "
                     if sep.get("all_running_at_once") else "They did not all run at once. ")
                  + (f"The train stage then sealed the three in {sep['stage_seconds']['train']:.1f} s. "
                     if "train" in sep.get("stage_seconds", {}) else "")
                  + (f"Shared-trunk training (run above) took {train_shared:.1f} s for all three." if train_shared
                     else "")]
    return lines


def _tests(t: dict | None) -> list[str]:
    if not t:
        return []
    counts = ", ".join(f"{t[k]} {k}" for k in ("passed", "failed", "skipped", "error") if t.get(k))
    return [f"CUDA tests on that machine (`{t['command']}`; {_when(t)}): {counts or 'no summary line'}."]


def render(results: dict[str, dict]) -> str:
    """The section's markdown, markers included."""
    blocks = [_machine(results.get("machine")), _tests(results.get("cuda_tests")), _detect(results.get("detect")),
              _pipeline(results.get("gpu_pipeline_shared"), results.get("gpu_pipeline_separate"))]
    body = "\n\n".join("\n".join(b) for b in blocks if b)
    return f"{BEGIN}\n{body}\n{END}"


def replace_section(readme: str, section: str) -> str:
    """``readme`` with the text between (and including) the markers replaced by ``section``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no section between {BEGIN!r} and {END!r}")
    return readme[:start] + section + readme[end + len(END):]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--check", action="store_true", help="exit 1 when the README's section is not what renders")
    args = ap.parse_args()
    readme = args.readme.read_text(encoding="utf-8")
    wanted = replace_section(readme, render(read_results(args.results)))
    if args.check:
        if wanted != readme:
            sys.exit(f"{args.readme}: the GPU figures differ from {args.results}; run python bench/gpu_readme.py")
        return
    args.readme.write_text(wanted, encoding="utf-8")


if __name__ == "__main__":
    main()
