"""A cached rerun of ``mammo run`` with nothing changed: wall and CPU seconds, and where they go.

Runs ``python -m flows.cli run -p PARAMS --store STORE`` (every stage reused) ``--repeats`` times and times
each phase from the moment its line appears on the run's output:

- ``startup``: process start to "Starting Prefect" (imports, params, stage keys, sha256 check of the
  reused folders, preflight);
- ``flow_start``: to the first stage line (waiting for the temporary Prefect server, the flow's start,
  opening the MLflow parent run);
- ``stages``: to "done in" (every stage looked up in the store, one cache-hit MLflow child run each);
- ``exit``: to the process's end (Prefect's workers drain, the server stops, the interpreter exits).

Also, each in a fresh process: the imports alone (the CLI, every stage module, MLflow's SQL store) and the
temporary Prefect server's start to its first healthy answer (it boots while the imports run).

Without ``--store``, a store is made first in a temporary folder by one full run (minutes on 2 cores).
``--code DIR`` runs another checkout's CLI (a before/after comparison; give it a store made by that code).
A rerun adds its cached child runs to the store's MLflow database, nothing else.

Prints one JSON line. Usage: python bench/cached_rerun.py [--store STORE] [-p params/smoke.yaml]
[--repeats 3] [--code DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 15.0  # issue 18, goal 3
MARKERS = (("startup", "Starting Prefect"), ("flow_start", re.compile(r"\[1/\d+\]")), ("stages", "done in "))
IMPORTS = ("import flows.cli, flows.pipeline, tasks.registry, tasks.run_tracking, "
           "mlflow.store.tracking.sqlalchemy_store")
SERVER_READY = """
import sys, tempfile, time
from pathlib import Path
from flows import environment, prefect_server
store = Path(tempfile.mkdtemp())
environment.configure(store)
began = time.perf_counter()
server = prefect_server.start(store)
server.go()
server.wait_ready(300)
print(time.perf_counter() - began)
server.stop()
"""


def _env(code: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "MAMMO_FAULT"))}
    env.update(PYTHONPATH=str(code), COLUMNS="200")
    return env


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(code: Path, params: Path, store: Path) -> dict:
    """One ``mammo run``: wall, CPU (with its children), the phases, and whether every stage was reused."""
    cpu0, began = _children_cpu(), time.perf_counter()
    seen: dict[str, float] = {}
    lines: list[str] = []
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-p", str(params), "--store", str(store)],
                            cwd=code, env=_env(code), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        for name, marker in MARKERS:
            hit = marker.search(line) if isinstance(marker, re.Pattern) else marker in line
            if name not in seen and hit:
                seen[name] = time.perf_counter() - began
    proc.wait()
    wall = time.perf_counter() - began
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"mammo run failed ({proc.returncode}):\n{out[-3000:]}")
    statuses = re.findall(r"│\s*\w+\s*│\s*(ran|cached|failed|stopped)\s*│", out)
    phases, previous = {}, 0.0
    for name, _ in MARKERS:
        at = seen.get(name, previous)
        phases[name] = at - previous
        previous = at
    phases["exit"] = wall - previous
    return {"wall_s": wall, "cpu_s": _children_cpu() - cpu0, "phases_s": phases,
            "all_cached": bool(statuses) and set(statuses) == {"cached"}, "stages": len(statuses)}


def timed_snippet(code: Path, snippet: str) -> tuple[float, float, str]:
    cpu0, began = _children_cpu(), time.perf_counter()
    out = subprocess.run([sys.executable, "-c", snippet], cwd=code, env=_env(code), capture_output=True, text=True,
                         check=True).stdout
    return time.perf_counter() - began, _children_cpu() - cpu0, out.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", type=Path, help="a store holding a finished run of these params")
    ap.add_argument("-p", "--params", type=Path, default=REPO / "params" / "smoke.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--code", type=Path, default=REPO, help="checkout whose CLI runs (default: this one)")
    args = ap.parse_args()
    code, params = args.code.resolve(), args.params.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store.resolve() if args.store else Path(tmp) / "store"
        first = None if args.store else timed_run(code, params, store)
        runs = [timed_run(code, params, store) for _ in range(args.repeats)]
    imports_wall, imports_cpu, _ = timed_snippet(code, IMPORTS)
    server_ready = None
    if (code / "flows" / "prefect_server.py").is_file():  # the code before it let Prefect start its own
        server_ready = float(timed_snippet(code, SERVER_READY)[2].splitlines()[-1])
    median = statistics.median
    result = {
        "bench": "cached_rerun", "params": str(params), "code": str(code), "repeats": args.repeats,
        "wall_s": round(median(r["wall_s"] for r in runs), 2),
        "cpu_s": round(median(r["cpu_s"] for r in runs), 2),
        "wall_each_s": [round(r["wall_s"], 2) for r in runs],
        "all_cached": all(r["all_cached"] for r in runs), "stages": runs[0]["stages"],
        "phases_s": {k: round(median(r["phases_s"][k] for r in runs), 2) for k in runs[0]["phases_s"]},
        "imports_alone_s": round(imports_wall, 2), "imports_alone_cpu_s": round(imports_cpu, 2),
        "prefect_server_ready_alone_s": round(server_ready, 2) if server_ready is not None else None,
        "limit_s": LIMIT_S, "within_limit": median(r["wall_s"] for r in runs) <= LIMIT_S,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if first is not None:
        result["first_run_s"] = round(first["wall_s"], 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
