"""The code a stage runs, found from the import graph: the project modules it reaches and the libraries.

Why: a stage key must change when any code that decides the stage's output changes. A hand-kept list of
modules drifts (acquire once missed ``phantom_render``, which draws the phantom's pixels); the static
import graph cannot. Starting from the stage module, every ``import``/``from ... import`` anywhere in a
module (function bodies included: lazy imports run too) is followed when it names a module of the
project's packages, relative imports and ``from package import module`` included, and every package
``__init__`` on the way counts (importing ``a.b.c`` runs ``a`` and ``a.b`` first). Imports of anything
else are third-party or standard library: the third-party top-level names are reported so that the
versions of those libraries can enter the key as well (:mod:`mammo_core.storage.library_versions`).

Static on purpose: nothing is imported, so a key is computed from the files as they are on disk (a copy
of the tree in a test, the checkout a scheduled run uses), and ``importlib.import_module`` calls with
computed names are the one thing it cannot see (the project has none).
"""

from __future__ import annotations

import ast
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

PROJECT_PACKAGES = ("mammo_core", "tasks", "flows")
# Dispatch tables: they import every stage in order to look one up by name (``tasks.runtime`` does so
# lazily to run a stage). Following them would make each stage's code every other stage's code; what
# they hold decides no stage's output.
DISPATCH_MODULES = frozenset({"tasks.registry"})

_parsed: dict[tuple[str, int, int], tuple[frozenset[str], frozenset[str]]] = {}


@dataclass(frozen=True)
class CodeClosure:
    """The project modules (name -> file) a module reaches, and the third-party top-level names they import."""

    root: Path
    modules: dict[str, Path]
    third_party: frozenset[str]

    def digest(self) -> str:
        """sha256 over (module name, source) of every module in the closure, in name order."""
        h = hashlib.sha256()
        for name in sorted(self.modules):
            h.update(name.encode())
            h.update(b"\0")
            h.update(self.modules[name].read_bytes())
            h.update(b"\0")
        return h.hexdigest()


def project_root_of(module_name: str, module_file: str | Path) -> Path:
    """The folder holding the top-level package of ``module_name`` (a plain module, not a package)."""
    return Path(module_file).resolve().parents[module_name.count(".")]


def module_path(root: Path, name: str) -> Path | None:
    """The source file of project module ``name`` under ``root``; None for anything outside the project."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = Path(root, *name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports_of(path: Path, name: str) -> tuple[frozenset[str], frozenset[str]]:
    """(absolute module names a file may import, top-level names of all its imports), cached per file state."""
    stat = path.stat()
    memo_key = (str(path), stat.st_mtime_ns, stat.st_size)
    if memo_key in _parsed:
        return _parsed[memo_key]
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{node.module}" if node.module else anchor
            else:
                base = node.module or ""
            names.add(base)
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import func`` names no module
            # (the candidate simply does not resolve to a file).
            names.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    result = (frozenset(n for n in names if n), frozenset(n.split(".")[0] for n in names if n))
    _parsed[memo_key] = result
    return result


def closure(module_name: str, root: Path) -> CodeClosure:
    """Every project module ``module_name`` reaches through imports, itself and the packages on the way."""
    root = Path(root)
    found: dict[str, Path] = {}
    looked_up: set[str] = set()
    top_level: set[str] = set()
    todo = [module_name]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        if parts[0] not in PROJECT_PACKAGES:
            continue
        for i in range(1, len(parts) + 1):  # the packages above a module run before it
            prefix = ".".join(parts[:i])
            if prefix in looked_up or prefix in DISPATCH_MODULES:
                continue
            looked_up.add(prefix)
            path = module_path(root, prefix)
            if path is None:
                continue
            found[prefix] = path
            imported, tops = _imports_of(path, prefix)
            top_level |= tops
            todo.extend(imported)
    if module_name not in found:
        raise ValueError(f"{module_name} is not a module of {', '.join(PROJECT_PACKAGES)} under {root}")
    third_party = frozenset(t for t in top_level if t not in PROJECT_PACKAGES and t not in sys.stdlib_module_names
                            and t != "__future__")
    return CodeClosure(root=root, modules=dict(sorted(found.items())), third_party=third_party)
