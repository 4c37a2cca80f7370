"""Nothing in the store is a pickle: loading the store never runs code (issue 15, section 5).

Prefect persists results under ``<store>/prefect/storage`` with its default pickle serializer unless told
otherwise, and unpickles them on a cache hit. After a full smoke run (the session's ``smoke_store``), every
file of the store is read: none may be a pickle stream, and Prefect's result files must be JSON written by
its JSON serializer. Torch weights (zip archives read with ``weights_only=True``) and skops files are not
pickle streams and are not flagged.
"""

from __future__ import annotations

import json
import pickletools
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def is_pickle(path: Path) -> bool:
    """True when the file is a pickle stream: a PROTO opcode (protocol 2-5) that ``pickletools`` can walk."""
    with open(path, "rb") as fh:
        head = fh.read(2)
    if len(head) < 2 or head[0] != 0x80 or head[1] not in (2, 3, 4, 5):
        return False
    try:
        for _ in pickletools.genops(path.read_bytes()):
            pass
    except Exception:  # binary data that happens to start like a pickle
        return False
    return True


def test_is_pickle_recognises_a_real_pickle(tmp_path):
    import pickle

    (tmp_path / "p.bin").write_bytes(pickle.dumps({"a": [1, 2]}, protocol=5))
    (tmp_path / "j.json").write_text('{"a": 1}')
    assert is_pickle(tmp_path / "p.bin") and not is_pickle(tmp_path / "j.json")


def test_no_pickle_in_the_store_after_a_run(smoke_store):
    files = [p for p in smoke_store.rglob("*") if p.is_file()]
    assert len(files) > 50, "the smoke store was read"
    assert [str(p.relative_to(smoke_store)) for p in files if is_pickle(p)] == []
    results = [p for p in (smoke_store / "prefect" / "storage").rglob("*") if p.is_file()]
    assert results, "the flow's result was persisted (PREFECT_RESULTS_PERSIST_BY_DEFAULT), as JSON"
    for path in results:
        json.loads(path.read_text(encoding="utf-8"))  # Prefect's JSON serializer; a pickle would not parse
