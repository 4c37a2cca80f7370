"""skops persistence: exact round-trip, hash check, and refusal of unexpected types and pickles."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import skops.io as sio
from sklearn.preprocessing import FunctionTransformer

from mammo_core.codes.classifiers import FusedClassifier, fit_classifiers, fit_learned_combiners, make_classifiers
from mammo_core.codes.model_io import TRUSTED_MODEL_TYPES, ModelFileError, load_model, save_model

SMALL = {"seed": 0, "rf": {"n_estimators": 10}, "svm": {"cv": 3}}


@pytest.fixture(scope="module")
def codes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=120)
    prototypes = np.random.default_rng(1).uniform(0.2, 0.8, size=(3, 24))
    X = (rng.random((120, 24)) < prototypes[y]).astype(np.uint8)
    return X, y


@pytest.fixture(scope="module")
def fused(codes):
    X, y = codes
    members = fit_classifiers(SMALL, X, y).estimators
    return FusedClassifier.from_fitted(members, {"svm": 0.4, "knn": 0.3, "rf": 0.3})


def test_round_trip_gives_identical_probabilities(tmp_path, codes, fused):
    X, _ = codes
    path = tmp_path / "models" / "fused.skops"
    digest = save_model(fused, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["fused.skops"]  # no temp file left behind
    loaded = load_model(path, digest)
    assert isinstance(loaded, FusedClassifier)
    np.testing.assert_array_equal(loaded.predict_proba(X), fused.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), fused.predict(X))
    assert loaded.n_features_in_ == 24


def test_learned_combiners_round_trip(tmp_path, codes):
    X, y = codes
    for name, est in fit_learned_combiners(make_classifiers(SMALL), X, y, stacking_cv=3).items():
        path = tmp_path / f"{name}.skops"
        loaded = load_model(path, save_model(est, path))
        np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))


def test_tampered_file_is_refused_by_hash(tmp_path, fused):
    path = tmp_path / "fused.skops"
    digest = save_model(fused, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"fused\.skops: sha256 .* does not match"):
        load_model(path, digest)
    with pytest.raises(ValueError, match="64-character"):
        load_model(path, "abc")


def test_unexpected_type_is_refused_even_with_the_right_hash(tmp_path):
    # A FunctionTransformer wrapping os.system: the kind of object a crafted file would carry.
    evil = FunctionTransformer(func=os.system)
    path = tmp_path / "evil.skops"
    sio.dump(evil, path)
    untrusted = sio.get_untrusted_types(file=path)
    assert untrusted and not set(untrusted) <= set(TRUSTED_MODEL_TYPES)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ModelFileError, match=r"evil\.skops: refusing to load.*system"):
        load_model(path, digest)
    with pytest.raises(ModelFileError, match="outside the allow-list"):
        save_model(evil, tmp_path / "evil2.skops")
    assert not (tmp_path / "evil2.skops").exists()
    with pytest.raises(TypeError, match="list of fully qualified type names"):
        load_model(path, digest, trusted=True)  # never a blanket "trust everything"


def test_explicit_allow_list_is_honoured(tmp_path, fused):
    path = tmp_path / "fused.skops"
    digest = save_model(fused, path)
    without_ours = [t for t in TRUSTED_MODEL_TYPES if t != "mammo_core.codes.classifiers.FusedClassifier"]
    with pytest.raises(ModelFileError, match="FusedClassifier"):
        load_model(path, digest, trusted=without_ours)


def test_a_pickle_is_refused_even_with_the_right_hash(tmp_path):
    path = tmp_path / "model.skops"
    path.write_bytes(pickle.dumps({"not": "a skops file"}))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ModelFileError, match=r"model\.skops: not a readable skops file"):
        load_model(path, digest)
