"""The installed versions of the libraries a stage's code imports, for its key.

Why: the same code and params give other numbers under another torch, numpy or scikit-learn (kernels,
default solvers, random streams), so a stage reused after an upgrade would not be what the current
environment produces. The libraries come from the stage's import graph
(:func:`mammo_core.storage.code_closure.closure`), so a new dependency enters the key without anyone listing it.

What is left out, and why:
- orchestration and tracking libraries (Prefect, MLflow, Dask's scheduler): by the project's layering they
  never touch the numbers, and an upgrade of them should not re-run days of training;
- libraries a stage does not import itself (torch's own pins, scikit-learn's joblib): a library's version
  already fixes the exact versions it pins (torch pins its cuDNN and NCCL builds), and following every
  transitive requirement would put setuptools and tzdata into every key.
- except the backends a library loads by name, which no import shows: pandas writes and reads Parquet
  through pyarrow (:data:`IMPLICIT_BACKENDS`).
The Python version enters too: the standard library (``random``, ``json``, ``statistics``) is code as well.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
import platform
from collections.abc import Iterable

ORCHESTRATION = frozenset({"prefect", "mlflow", "distributed", "dask"})
IMPLICIT_BACKENDS = {"pandas": ("pyarrow",)}
# Import names whose distribution is named otherwise. Only a shortcut: a name missing here is found by
# scanning every installed distribution (about a second), never skipped.
_DISTRIBUTION_OF = {
    "PIL": "pillow", "sklearn": "scikit-learn", "skimage": "scikit-image", "cv2": "opencv-python-headless",
    "yaml": "PyYAML",
}


@functools.cache
def _all_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


@functools.cache
def version_of(import_name: str) -> str:
    """``<distribution>==<version>`` for a top-level import name; ``<name>: not installed`` when absent."""
    dist = _DISTRIBUTION_OF.get(import_name, import_name)
    try:
        return f"{dist}=={metadata.version(dist)}"
    except metadata.PackageNotFoundError:
        pass
    found = _all_distributions().get(import_name, [])
    if found:
        return ",".join(f"{d}=={metadata.version(d)}" for d in sorted(set(found)))
    return f"{import_name}: not installed"


def library_versions(import_names: Iterable[str]) -> dict[str, str]:
    """{import name: distribution==version} for the non-orchestration libraries, plus ``python``."""
    names = set(import_names) - ORCHESTRATION
    names |= {backend for name in names for backend in IMPLICIT_BACKENDS.get(name, ())}
    versions = {name: version_of(name) for name in sorted(names)}
    versions["python"] = platform.python_version()
    return versions
