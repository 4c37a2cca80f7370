"""Only this project's own registered models are loaded, and only when their files are the registered ones.

Why: loading an MLflow model runs whatever its MLmodel file names. A ``python_function`` model logged with
cloudpickle (``python_model: python_model.pkl``), a models-from-code script, or ``code`` paths shipped in
the artifact folder run code from the artifact the moment ``mlflow.pyfunc.load_model`` is called. Anyone
who can register a version (or write to the artifact store) could then run code on the host that serves.

So, before anything is unpickled or imported from a model:

1. The URI must name a registered version (``models:/NAME/VERSION``, ``models:/NAME/latest`` or
   ``models:/NAME@ALIAS``) of one of :data:`OWN_MODELS`.
2. The version must carry the digests tag :data:`DIGESTS_TAG` that :func:`register` sets *at registration*
   (the registry, not the artifact folder, holds it).
3. The files are downloaded (downloading runs nothing) and every file must match its recorded sha256; a
   file missing, added or changed is refused.
4. The MLmodel (read with a safe YAML loader) must have the ``python_function`` flavor only, its
   ``loader_module`` must be the one this project uses for that model, found in the installed package (not
   in the artifact folder), with no ``code`` paths, no ``python_model`` pickle and no model-code script.

Anything else raises :class:`UntrustedModel` with one line saying why. The verified local copy is what is
then loaded, so the files checked are the files used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

OWN_MODELS = {"mammo-classifier": "tasks.serving.classifier", "mammo-detector": "tasks.serving.detector"}
DIGESTS_TAG = "mammo.sha256"
PRODUCER_TAG = "mammo.producer"
PRODUCER = "mammo-fusion"
PYFUNC = "python_function"
# written by MLflow itself into a local model folder whenever ``models:/NAME/VERSION`` is downloaded without a
# destination (name and version as YAML; never imported or unpickled), so it may appear after registration
MLFLOW_WRITES = frozenset({"registered_model_meta"})
# keys of the python_function flavor that make MLflow import or unpickle something from the artifact folder
_CODE_KEYS = ("code", "python_model", "model_code_path", "cloudpickle_version", "func")
_URI = re.compile(r"^models:/+(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))$")


class UntrustedModel(Exception):
    """A model that this project will not load; the message is one line saying why."""


@dataclass(frozen=True)
class VerifiedModel:
    """A registered version whose downloaded files passed every check: load ``path``, nothing else."""

    name: str
    version: str
    path: Path
    loader_module: str
    tags: dict[str, str]


def file_digests(folder: str | Path) -> dict[str, str]:
    """``relative posix path -> sha256`` of every file under ``folder``."""
    folder = Path(folder)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[path.relative_to(folder).as_posix()] = digest.hexdigest()
    return out


def _package_folder() -> Path:
    return Path(__file__).resolve().parent


def check_flavor(folder: Path, name: str) -> str:
    """The loader module of the MLmodel in ``folder`` if it is this project's for ``name``; else UntrustedModel."""
    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file():
        raise UntrustedModel(f"{name}: no MLmodel file in the model folder")
    try:
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UntrustedModel(f"{name}: MLmodel is not plain YAML ({type(exc).__name__})") from None
    flavors = (meta or {}).get("flavors") if isinstance(meta, dict) else None
    if not isinstance(flavors, dict) or set(flavors) != {PYFUNC}:
        raise UntrustedModel(f"{name}: flavors {sorted(flavors or {})} are not this project's "
                             f"(only {PYFUNC} with loader module {OWN_MODELS[name]})")
    conf = flavors[PYFUNC] or {}
    shipped = [k for k in _CODE_KEYS if conf.get(k)]
    if shipped:
        raise UntrustedModel(f"{name}: the model ships code to run on load ({', '.join(shipped)}); refusing")
    loader = conf.get("loader_module")
    if loader != OWN_MODELS[name]:
        raise UntrustedModel(f"{name}: loader module {loader!r} is not this project's ({OWN_MODELS[name]})")
    spec = importlib.util.find_spec(loader)
    origin = Path(spec.origin).resolve() if spec and spec.origin else None
    if origin is None or not origin.is_relative_to(_package_folder()) or origin.is_relative_to(folder.resolve()):
        raise UntrustedModel(f"{name}: loader module {loader} does not come from the installed package")
    return loader


def check_digests(folder: Path, recorded: dict[str, str], name: str) -> None:
    """UntrustedModel unless the files under ``folder`` are exactly the recorded ones, byte for byte."""
    found = file_digests(folder)
    changed = sorted(p for p in found.keys() & recorded.keys() if found[p] != recorded[p])
    added = sorted(found.keys() - recorded.keys() - MLFLOW_WRITES)
    missing = sorted(recorded.keys() - found.keys())
    if changed:
        raise UntrustedModel(f"{name}: {changed[0]}: sha256 differs from the digest recorded at registration")
    if added:
        raise UntrustedModel(f"{name}: {added[0]}: file not recorded at registration")
    if missing:
        raise UntrustedModel(f"{name}: {missing[0]}: recorded file is missing")


def resolve_version(client, model_uri: str):
    """The registry's ModelVersion for a ``models:/`` URI of one of our models; UntrustedModel otherwise."""
    from mlflow.exceptions import MlflowException

    match = _URI.match(model_uri.strip())
    if match is None:
        raise UntrustedModel(f"{model_uri}: only registered models are loaded "
                             f"(models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS)")
    name = match["name"]
    if name not in OWN_MODELS:
        raise UntrustedModel(f"{model_uri}: {name!r} is not one of this project's models {sorted(OWN_MODELS)}")
    if match["alias"]:
        return client.get_model_version_by_alias(name, match["alias"])
    if match["version"].lower() == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise MlflowException(f"no version of {name}", error_code="RESOURCE_DOES_NOT_EXIST")
        return max(versions, key=lambda v: int(v.version))
    return client.get_model_version(name, match["version"])


def fetch_verified(model_uri: str, tracking_uri: str, dst: str | Path | None = None) -> VerifiedModel:
    """Download a registered version of our models into ``dst`` and check it (module docstring, steps 1-4)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    version = resolve_version(client, model_uri)
    name, tags = version.name, dict(version.tags or {})
    label = f"{name} version {version.version}"
    raw = tags.get(DIGESTS_TAG)
    if tags.get(PRODUCER_TAG) != PRODUCER or not raw:
        raise UntrustedModel(f"{label} was not registered by {PRODUCER} (no file digests recorded in the "
                             f"registry); refusing to load it")
    try:
        recorded = json.loads(raw)
    except json.JSONDecodeError:
        raise UntrustedModel(f"{label}: the recorded digests are not valid JSON") from None
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="mammo-model-"))
    location = client.get_model_version_download_uri(name, version.version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst),
                                                     tracking_uri=tracking_uri))
    try:
        check_digests(local, recorded, label)
        loader = check_flavor(local, name)
    except UntrustedModel as exc:
        raise UntrustedModel(str(exc).replace(name + ":", label + ":", 1)) from None
    return VerifiedModel(name, str(version.version), local, loader, tags)


def register(client, model_uri: str, name: str, run_id: str) -> str:
    """Register a just-logged model of ours as a new version of ``name``, its file digests in the version's tags.

    The digests are computed from the logged files as the artifact store holds them (downloaded), so the
    check at load time compares with what was actually stored. Returns the version number.
    """
    import mlflow

    with tempfile.TemporaryDirectory(prefix="mammo-register-") as tmp:
        location = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=tmp,
                                                         tracking_uri=client.tracking_uri))
        check_flavor(local, name)  # never register something we would refuse to load
        digests = {p: d for p, d in file_digests(local).items() if p not in MLFLOW_WRITES}
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    tags = {PRODUCER_TAG: PRODUCER, DIGESTS_TAG: json.dumps(digests, sort_keys=True)}
    version = client.create_model_version(name, model_uri, run_id=run_id, tags=tags,
                                          model_id=model_uri.removeprefix("models:/"))
    return str(version.version)
