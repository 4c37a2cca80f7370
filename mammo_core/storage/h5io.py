"""Chunked, compressed HDF5 output written from a background thread, and the helpers that read it back.

Why a background writer: compression and disk I/O are slow next to the work that produces the rows
(patch extraction, augmentation, feature extraction). The producer hands each batch to a bounded queue
and goes on; one thread owns the file and appends. The bound keeps memory flat when the disk is slower
than the producer. Rows land in the order they were appended.

Why a temporary file: readers (and the stage store) must never see half a file. The writer fills a
hidden sibling and renames it into place on a clean close; an exception inside the ``with`` block (or
in the writer thread) removes the temporary and leaves no file at the final path.

Attributes are stored as JSON text (one attribute per key) and must be JSON-able; :func:`read_attrs`
decodes them. A key, at any depth of the value, that names a DICOM element outside the one allow-list of
what may leave a DICOM (``dicom_io.ALLOWED_FIELDS``; ``dicom_io.withheld_keyword``) is refused, so a
header dict passed along by accident cannot leak an identifier.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mammo_core.data import dicom_io
from mammo_core.runtime import faults

_CHUNK_BYTES = 1 << 20  # aim for chunks of about 1 MiB: large enough to compress well, small to read
_SENTINEL = object()


@dataclass(frozen=True)
class DatasetSpec:
    """One appendable dataset: ``row_shape`` is the shape of one row (``()`` for a scalar per row)."""

    name: str
    dtype: Any
    row_shape: tuple[int, ...] = ()
    compress: bool = True


def _chunk_rows(row_shape: tuple[int, ...], dtype: np.dtype, cap: int) -> int:
    row_bytes = max(1, int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize)
    return int(max(1, min(cap, _CHUNK_BYTES // row_bytes)))


def _withheld_keys(value: Any, path: str) -> list[str]:
    """``path`` of every mapping key inside ``value`` (any depth) that names a withheld DICOM element."""
    found: list[str] = []
    if isinstance(value, Mapping):
        for k, v in value.items():
            inner = f"{path}.{k}"
            if dicom_io.withheld_keyword(str(k)):
                found.append(inner)
            found += _withheld_keys(v, inner)
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found += _withheld_keys(v, f"{path}[{i}]")
    return found


def _check_attr(key: str, value: Any) -> str:
    withheld = ([key] if dicom_io.withheld_keyword(key) else []) + _withheld_keys(value, key)
    if withheld:
        raise ValueError(f"attribute {', '.join(map(repr, withheld))} names a DICOM element that may not leave "
                         "a DICOM (a patient identifier); it may not be stored")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"attribute {key!r} is not JSON-able: {exc}") from None


def _as_column(spec: DatasetSpec, values: Any) -> np.ndarray:
    """Validate one batch of one dataset; a copy, so the producer may reuse its buffers."""
    dtype = np.dtype(spec.dtype)
    if dtype.kind == "S":
        encoded = [v.encode("utf-8") if isinstance(v, str) else bytes(v) for v in values]
        too_long = [v for v in encoded if len(v) > dtype.itemsize]
        if too_long:
            raise ValueError(
                f"dataset {spec.name!r}: value {too_long[0]!r} is longer than {dtype.itemsize} bytes"
            )
        return np.array(encoded, dtype=dtype).reshape(len(encoded))
    array = np.array(values, copy=True)
    if array.shape[1:] != spec.row_shape:
        raise ValueError(f"dataset {spec.name!r}: rows of shape {array.shape[1:]}, expected {spec.row_shape}")
    if np.issubdtype(dtype, np.integer) and array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"dataset {spec.name!r}: expected integers, got {array.dtype}")
    if np.issubdtype(dtype, np.integer) and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise ValueError(f"dataset {spec.name!r}: values outside the range of {dtype}")
    return array.astype(dtype, copy=False)


class ChunkedH5Writer:
    """Append batches of rows to resizable, chunked, compressed datasets from a background thread.

    Use as a context manager::

        with ChunkedH5Writer(path, specs, attrs={"size": 64}) as writer:
            writer.append(images=batch, labels=batch_labels)

    ``compression`` is ``"gzip"`` (smaller, portable; ``level`` 0-9) or ``"lzf"`` (faster) or ``None``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Sequence[DatasetSpec],
        *,
        attrs: Mapping[str, Any] | None = None,
        compression: str | None = "gzip",
        level: int = 4,
        chunk_rows: int = 256,
        queue_batches: int = 8,
    ):
        if compression not in ("gzip", "lzf", None):
            raise ValueError(f"compression must be 'gzip', 'lzf' or None, not {compression!r}")
        names = [s.name for s in specs]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"dataset names must be unique and non-empty: {names}")
        self.path = Path(path)
        self.specs = {s.name: s for s in specs}
        self._attrs = {k: _check_attr(k, v) for k, v in (attrs or {}).items()}
        self._compression = compression
        self._level = level
        self._chunk_rows = chunk_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_batches))
        self._tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        self._file: h5py.File | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abort = threading.Event()
        self.rows_appended = 0  # rows handed to the writer (the producer's view)

    # -- producer side -------------------------------------------------------------------------
    def set_attrs(self, **attrs: Any) -> None:
        """Add or replace file attributes (written at close, e.g. counts known only at the end)."""
        self._attrs.update({k: _check_attr(k, v) for k, v in attrs.items()})

    def append(self, **columns: Any) -> None:
        """Queue one batch: every dataset, the same number of rows. Blocks only when the queue is full."""
        if self._thread is None:
            raise RuntimeError("ChunkedH5Writer.append outside its 'with' block")
        self._raise_writer_error()
        if set(columns) != set(self.specs):
            missing, extra = set(self.specs) - set(columns), set(columns) - set(self.specs)
            raise ValueError(f"append needs exactly the datasets {sorted(self.specs)}; "
                             f"missing {sorted(missing)}, unknown {sorted(extra)}")
        batch = {name: _as_column(self.specs[name], values) for name, values in columns.items()}
        lengths = {name: len(col) for name, col in batch.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"append: datasets have different row counts {lengths}")
        n = next(iter(lengths.values()))
        if n == 0:
            return
        self._put(batch)
        self.rows_appended += n

    def _put(self, item: Any) -> None:
        while True:
            self._raise_writer_error()
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("HDF5 writer thread stopped unexpectedly")
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing {self.path.name} failed: {self._error!r}") from self._error

    # -- writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._file is not None
        datasets = {name: self._file[name] for name in self.specs}
        try:
            while True:
                item = self._queue.get()
                if item is _SENTINEL:
                    return
                if self._abort.is_set() or self._error is not None:
                    continue  # drain without writing so a blocked producer is released
                n = len(next(iter(item.values())))
                start = datasets[next(iter(self.specs))].shape[0]
                for name, column in item.items():
                    ds = datasets[name]
                    ds.resize(start + n, axis=0)
                    ds[start:start + n] = column
                faults.at("h5:write")
        except BaseException as exc:  # reported to the producer by append/__exit__, never swallowed
            self._error = exc
            while self._queue.get() is not _SENTINEL:  # keep draining until the producer stops
                pass

    # -- context manager ---------------------------------------------------------------------------
    def __enter__(self) -> ChunkedH5Writer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(self._tmp, "w")
        try:
            for spec in self.specs.values():
                dtype = np.dtype(spec.dtype)
                opts: dict[str, Any] = {}
                if spec.compress and self._compression:
                    opts["compression"] = self._compression
                    if self._compression == "gzip":
                        opts["compression_opts"] = self._level
                    opts["shuffle"] = dtype.kind in "iuf" and dtype.itemsize > 1
                rows = _chunk_rows(spec.row_shape, dtype, self._chunk_rows)
                self._file.create_dataset(
                    spec.name, shape=(0, *spec.row_shape), maxshape=(None, *spec.row_shape),
                    dtype=dtype, chunks=(rows, *spec.row_shape), **opts,
                )
        except BaseException:
            self._discard()
            raise
        self._thread = threading.Thread(target=self._run, name=f"h5-writer-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort.set()
        self._stop_thread()
        if exc_type is not None or self._error is not None:
            self._discard()
            if exc_type is None:
                self._raise_writer_error()
            return
        try:
            assert self._file is not None
            for key, text in self._attrs.items():
                self._file.attrs[key] = text
            self._file.flush()
            self._file.close()
            self._file = None
            with open(self._tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self._tmp, self.path)
        except BaseException:
            self._discard()
            raise

    def _stop_thread(self) -> None:
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:
                self._queue.put(_SENTINEL, timeout=0.1)
                break
            except queue.Full:
                continue
        self._thread.join()
        self._thread = None

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None
        self._tmp.unlink(missing_ok=True)


# -- reading -------------------------------------------------------------------------------------------
class UnreadableH5Error(OSError):
    """An HDF5 file that cannot be opened (truncated, overwritten, not HDF5); the message names the file."""


def open_for_reading(path: str | os.PathLike) -> h5py.File:
    """Open ``path`` read-only; a corrupt file raises :class:`UnreadableH5Error` naming it.

    Why: h5py's own message ("file signature not found", "truncated file: eof = ...") does not say
    which file, and a user with several stage folders needs to know which one to regenerate.
    """
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableH5Error(f"{path}: not a readable HDF5 file ({exc}); regenerate it (mammo run --force "
                                "<the stage that wrote it>)") from exc


def read_attrs(path: str | os.PathLike) -> dict[str, Any]:
    """All file attributes, JSON-decoded (values written by :class:`ChunkedH5Writer`)."""
    with open_for_reading(path) as fh:
        out = {}
        for key, value in fh.attrs.items():
            if isinstance(value, bytes):
                value = value.decode("utf-8")
            try:
                out[key] = json.loads(value) if isinstance(value, str) else value
            except json.JSONDecodeError:
                out[key] = value
        return out


def read_datasets(
    path: str | os.PathLike, names: Sequence[str] | None = None, rows: slice | np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Read whole datasets (or the same rows of each) into memory; a missing name is a clear KeyError."""
    with open_for_reading(path) as fh:
        names = list(names) if names is not None else [k for k in fh if isinstance(fh[k], h5py.Dataset)]
        missing = [n for n in names if n not in fh]
        if missing:
            raise KeyError(f"{Path(path).name} has no dataset {missing}; it holds {sorted(fh)}")
        selection = slice(None) if rows is None else rows
        return {n: fh[n][selection] for n in names}


def iter_blocks(
    path: str | os.PathLike, names: Sequence[str], block_rows: int
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield ``(first_row, {name: rows})`` over contiguous blocks: memory stays bounded on big files."""
    if block_rows < 1:
        raise ValueError("block_rows must be at least 1")
    with open_for_reading(path) as fh:
        missing = [n for n in names if n not in fh]
        if missing:
            raise KeyError(f"{Path(path).name} has no dataset {missing}; it holds {sorted(fh)}")
        lengths = {n: fh[n].shape[0] for n in names}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{Path(path).name}: datasets have different lengths {lengths}")
        total = next(iter(lengths.values()), 0)
        for start in range(0, total, block_rows):
            stop = min(total, start + block_rows)
            yield start, {n: fh[n][start:stop] for n in names}


def decode_strings(values: np.ndarray) -> list[str]:
    """Fixed-length byte strings (as stored) back to Python strings."""
    return [v.decode("utf-8") if isinstance(v, bytes | np.bytes_) else str(v) for v in values]


def string_dtype(values: Sequence[str], minimum: int = 1) -> np.dtype:
    """The fixed-length bytes dtype that holds every value of ``values`` (UTF-8)."""
    longest = max((len(v.encode("utf-8")) for v in values), default=0)
    return np.dtype(f"S{max(minimum, longest)}")
