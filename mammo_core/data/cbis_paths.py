"""The path strings of the CBIS-DDSM case CSVs.

A CSV path reads ``<series folder>/<StudyInstanceUID>/<SeriesInstanceUID>/<file>.dcm`` where the
series folder is e.g. ``Mass-Training_P_00001_LEFT_CC`` (full image) or
``Mass-Training_P_00001_LEFT_CC_1`` (ROI series of abnormality 1). Real downloads do not keep the
file names (``000000.dcm`` becomes ``1-1.dcm``) and the descriptive NBIA layout renames the UID folders,
so resolvers join on the UIDs, never on the file name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_UID = re.compile(r"^[0-9]+(\.[0-9]+)+$")


@dataclass(frozen=True)
class CbisPath:
    folder: str  # e.g. "Mass-Training_P_00001_LEFT_CC_1"
    study_uid: str
    series_uid: str
    filename: str  # as written in the CSV ("000000.dcm"); not reliable on disk

    @property
    def study_suffix(self) -> str:
        """Last five digits of the study UID: the descriptive layout's study folder ends with them."""
        return self.study_uid.replace(".", "")[-5:]

    @property
    def series_suffix(self) -> str:
        """Last five digits of the series UID: the descriptive layout's series folder ends with them."""
        return self.series_uid.replace(".", "")[-5:]


class CbisPathError(ValueError):
    """A CSV path cell that is not a safe CBIS path.

    ``problem`` says what is wrong without quoting the cell: CSV rejection reasons travel into the
    quarantine table, the curation report and MLflow, and a mistyped cell may hold anything, a name too.
    The message (``str``) quotes the cell for a person debugging one file by hand.
    """

    def __init__(self, problem: str, text: str):
        super().__init__(f"{problem}: {text!r}")
        self.problem = problem


def parse_cbis_path(raw: str) -> CbisPath:
    """Parse one CSV path cell (stray whitespace and the embedded newline quirk removed).

    Raises :class:`CbisPathError` (a ValueError) naming the cell when it is not of the four-part CBIS
    form, when a part escapes the data root (``..``, absolute paths) or when a UID is malformed.
    """
    text = str(raw).strip().replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise CbisPathError("absolute path in CSV cell", text)
    parts = [p for p in text.split("/") if p]
    if any(p in ("..", ".") for p in parts):
        raise CbisPathError("path escapes the data root", text)
    if len(parts) != 4:
        raise CbisPathError("expected folder/study_uid/series_uid/file", text)
    folder, study, series, filename = parts
    for uid in (study, series):
        if not _UID.match(uid):
            raise CbisPathError("malformed study or series UID", text)
    return CbisPath(folder=folder, study_uid=study, series_uid=series, filename=filename)
