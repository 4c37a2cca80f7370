"""Before a run starts: every sealed stage it would reuse still matches its manifest, byte for byte.

Why here, before the flow: a damaged folder found inside the flow would surface as a failed flow run with
Prefect's traceback and a half-opened MLflow run; found here, the user gets one line naming the file and
the ``--force`` that replaces it, and nothing has started. The stages re-check on reuse anyway
(``tasks.runtime``), through the same hash cache, so that second look costs a ``stat`` per file.
"""

from __future__ import annotations

from pathlib import Path

from mammo_core.config import Params
from mammo_core.storage.store import ArtifactStore
from mammo_core.storage.verified_files import VerifiedFiles
from tasks import registry


def reused_stages(stages: list[str] | None, force: list[str]) -> list[str]:
    """The stages a run with these ``stages``/``force`` would take from the store if they are sealed."""
    selected = set(stages) if stages else {s.name for s in registry.ORDER}
    needed = selected.union(*(registry.ancestors(s) for s in selected))
    forced = set().union(*(registry.descendants(s) for s in force)) if force else set()
    return [s.name for s in registry.ORDER if s.name in needed - forced]


def verify_reusable(params: Params, store: str | Path, stages: list[str] | None, force: list[str]) -> int:
    """Verify the sealed folders the run would reuse; IntegrityError for the first damaged file.

    Returns the number of folders verified.
    """
    keys = registry.stage_keys(params)
    art = ArtifactStore(store)
    verified = VerifiedFiles(art.root)
    checked = 0
    try:
        for name in reused_stages(stages, force):
            folder = art.find(name, keys[name])
            if folder is not None:
                art.verify(folder, sha256_of=verified.sha256)
                checked += 1
    finally:
        verified.save()
    return checked
