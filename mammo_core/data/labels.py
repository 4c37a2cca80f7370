"""Class schemes (DESIGN.md §6): which integer label a patch of a given lesion gets.

Index 0 is always the background class (NORMAL, or NOT_MALIGNANT in the binary scheme, where normal
tissue and benign lesions share a label), so background patches get ``NORMAL_LABEL`` whatever the scheme.
"""

from __future__ import annotations

NORMAL_LABEL = 0

_SCHEMES: dict[str, tuple[str, ...]] = {
    "seven": (
        "NORMAL",
        "MASS_BENIGN",
        "MASS_BENIGN_WITHOUT_CALLBACK",
        "MASS_MALIGNANT",
        "CALC_BENIGN",
        "CALC_BENIGN_WITHOUT_CALLBACK",
        "CALC_MALIGNANT",
    ),
    # BENIGN_WITHOUT_CALLBACK counted benign.
    "five": ("NORMAL", "MASS_BENIGN", "MASS_MALIGNANT", "CALC_BENIGN", "CALC_MALIGNANT"),
    "binary": ("NOT_MALIGNANT", "MALIGNANT"),
}
SCHEMES = tuple(_SCHEMES)
PATHOLOGIES = ("BENIGN", "BENIGN_WITHOUT_CALLBACK", "MALIGNANT")
_TYPES = {"mass": "MASS", "calc": "CALC", "calcification": "CALC"}


def class_names(scheme: str) -> list[str]:
    """The class names of ``scheme`` in label order (index 0 = background)."""
    try:
        return list(_SCHEMES[scheme])
    except KeyError:
        raise ValueError(f"unknown class scheme {scheme!r}; choose from {list(SCHEMES)}") from None


def label_of(abnormality_type: str, pathology: str, scheme: str) -> int:
    """Label of a lesion of ``abnormality_type`` ("mass"/"calc") and ``pathology`` under ``scheme``."""
    names = class_names(scheme)
    kind = _TYPES.get(str(abnormality_type).lower())
    if kind is None:
        raise ValueError(f"unknown abnormality type {abnormality_type!r}; expected 'mass' or 'calc'")
    pathology = str(pathology).upper()
    if pathology not in PATHOLOGIES:
        raise ValueError(f"unknown pathology {pathology!r}; expected one of {list(PATHOLOGIES)}")
    if scheme == "binary":
        return names.index("MALIGNANT" if pathology == "MALIGNANT" else "NOT_MALIGNANT")
    if scheme == "five" and pathology == "BENIGN_WITHOUT_CALLBACK":
        pathology = "BENIGN"
    return names.index(f"{kind}_{pathology}")
