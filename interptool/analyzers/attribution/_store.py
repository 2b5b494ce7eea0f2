"""HDF5 storage of attribution maps (``attributions.h5``), appended per batch and resumable.

Layout (format ``interptool-attributions/1``)::

    /index        (N,) utf-8     data set ids, in run order
    /labels       (N,) int64     class labels (-1 unlabelled)
    /targets      (N,) int64     class whose score was attributed
    /predictions  (N,) int64     arg-max of the model's logits
    /attributions/<method>       (N, H, W) float32 reduced maps
    /attributions/<method>_raw   (N, C, H, W) float32, only with keep_raw

root attributes: ``format``, ``model`` (JSON model info), ``data_spec``,
``data_fingerprint``, ``target_mode`` (JSON), ``input_shape`` (JSON [C, H, W]),
``versions`` (JSON), ``created``, ``complete`` (every method complete).
``/attributions/<method>`` attributes: ``params`` (JSON), ``reduce``, ``batch_size``,
``n_done`` (rows written), ``complete`` (set only when the run finished).

A run appends rows batch by batch and raises ``n_done`` after each flush; an interrupted run
is resumed from ``n_done`` (rows past it are discarded), which yields the same content as an
uninterrupted run (stochastic methods seed each batch from ``(seed, batch start)``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from interptool._provenance import now_iso, output_lock, versions
from interptool.errors import AnalysisError, CacheError

FORMAT = "interptool-attributions/1"
_ROW_SETS = ("index", "labels", "targets", "predictions")


def _json(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


class AttributionStore:
    """Open (create or resume) ``attributions.h5`` for one method run.

    Parameters mirror what must match for a resume: model info, data identity, target mode,
    input shape and the method's params. A mismatch raises AnalysisError with the fix.
    ``ids``: the data-set ids of this run's rows, in order; when the file's shared rows
    (``/index``) hold other images, the file is refused, or started again with ``overwrite``.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        method: str,
        params: dict[str, Any],
        reduce: str,
        batch_size: int,
        model_info: dict[str, Any],
        data_spec: str,
        data_fingerprint: str,
        target_mode: Any,
        input_shape: tuple[int, int, int],
        keep_raw: bool,
        overwrite: bool = False,
        ids: Sequence[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.method = method
        self.keep_raw = keep_raw
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # interptool's own lock (HDF5's may be off on NFS), held until close(), taken before
        # the file is looked at: a second writer stops before it resumes or replaces anything
        self._lock = ExitStack()
        self._lock.enter_context(output_lock(self.path, fix="choose another --out"))
        try:
            self.f = _open_for_append(self.path, overwrite)
        except BaseException:
            self._lock.close()
            raise
        try:
            self._setup(params, reduce, batch_size, model_info, data_spec, data_fingerprint,
                        target_mode, input_shape, overwrite, ids)
        except BaseException:
            self.f.close()
            self._lock.close()
            raise

    # ------------------------------------------------------------------ setup
    def _setup(self, params, reduce, batch_size, model_info, data_spec, data_fingerprint,
               target_mode, input_shape, overwrite, ids) -> None:
        f = self.f
        root = {
            "model": _json(model_info),
            "data_spec": str(data_spec),
            "data_fingerprint": str(data_fingerprint),
            "target_mode": _json(target_mode),
            "input_shape": _json(list(input_shape)),
        }
        if "format" in f.attrs:
            if f.attrs["format"] != FORMAT:
                raise CacheError(f"{self.path} is not an attribution file (format "
                                 f"{f.attrs['format']!r}); choose another --out")
            for key in ("model", "data_fingerprint", "target_mode", "input_shape"):
                if f.attrs.get(key) != root[key]:
                    if overwrite:
                        f = self._wipe()
                        break
                    raise AnalysisError(
                        f"{self.path} holds attributions for a different {key.replace('_', ' ')} "
                        f"({f.attrs.get(key)} vs {root[key]}); use another output folder or "
                        "overwrite=True / --overwrite"
                    )
        if "index" in f and ids is not None:
            differ = _first_difference(self.stored_ids(0, len(ids)), ids)
            if differ is not None:
                if not overwrite:
                    raise AnalysisError(_other_rows_message(self.path, *differ))
                # /index, /labels, /targets and /predictions are shared by every method of
                # the file, so they can hold one image sample only: the maps of the other
                # methods describe the old rows and would be mislabelled under the new ones.
                # --overwrite means "this run's result replaces what is there", so the file
                # starts again (other methods' maps dropped) rather than refusing a run the
                # user explicitly asked to replace the old one
                f = self._wipe()
        if "format" not in f.attrs:
            f.attrs["format"] = FORMAT
            f.attrs["created"] = now_iso()
            f.attrs["versions"] = _json(versions())
            for k, v in root.items():
                f.attrs[k] = v
        f.attrs["complete"] = False
        group = f.require_group("attributions")
        c, h, w = input_shape
        meta = {"params": _json(params), "reduce": reduce, "batch_size": int(batch_size)}
        if self.method in group:
            ds = group[self.method]
            same = (params_match(ds.attrs.get("params"), params)
                    and all(ds.attrs.get(k) == v for k, v in meta.items() if k != "params"))
            if not same or overwrite:
                if not overwrite:
                    raise AnalysisError(
                        f"{self.path} already holds {self.method!r} maps made with other "
                        f"settings ({ds.attrs.get('params')}, reduce={ds.attrs.get('reduce')}, "
                        f"batch_size={ds.attrs.get('batch_size')}); use another output folder "
                        "or overwrite=True / --overwrite"
                    )
                del group[self.method]
                if f"{self.method}_raw" in group:
                    del group[f"{self.method}_raw"]
        if self.method not in group:
            ds = group.create_dataset(self.method, shape=(0, h, w), maxshape=(None, h, w),
                                      dtype="float32", chunks=(1, h, w))
            for k, v in meta.items():
                ds.attrs[k] = v
            ds.attrs["n_done"] = 0
            ds.attrs["complete"] = False
        if self.keep_raw and f"{self.method}_raw" not in group:
            if int(group[self.method].attrs["n_done"]) > 0:
                # raw rows cannot be recovered for finished batches: start this method over
                group[self.method].resize(0, axis=0)
                group[self.method].attrs["n_done"] = 0
            group.create_dataset(f"{self.method}_raw", shape=(0, c, h, w),
                                 maxshape=(None, c, h, w), dtype="float32",
                                 chunks=(1, c, h, w))
        for name, dtype in (("index", h5py.string_dtype("utf-8")), ("labels", "int64"),
                            ("targets", "int64"), ("predictions", "int64")):
            if name not in f:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dtype)
        self.ds = group[self.method]
        self.raw = group.get(f"{self.method}_raw") if self.keep_raw else None
        # rows past n_done belong to a batch that was interrupted mid-write: drop them
        n_done = self.n_done
        self.ds.resize(n_done, axis=0)
        if self.raw is not None:
            if self.raw.shape[0] < n_done:  # raw file shorter: recompute from there
                n_done = self.raw.shape[0]
                self.ds.resize(n_done, axis=0)
                self.ds.attrs["n_done"] = n_done
            self.raw.resize(n_done, axis=0)
        self.ds.attrs["complete"] = False
        f.flush()

    def _wipe(self) -> h5py.File:
        """Start the file again, empty (under the lock we hold); returns the new handle.
        A new file rather than deleting its datasets: HDF5 never gives the space of deleted
        datasets back, so overwriting large runs in place would grow the file each time."""
        self.f.close()
        self.path.unlink()
        self.f = h5py.File(self.path, "a")
        return self.f

    # ------------------------------------------------------------------ rows
    @property
    def n_done(self) -> int:
        return int(self.ds.attrs["n_done"])

    def stored_ids(self, start: int, stop: int) -> list[str]:
        n = self.f["index"].shape[0]
        stop = min(stop, n)
        if start >= stop:
            return []
        return [s.decode() if isinstance(s, bytes) else str(s)
                for s in self.f["index"][start:stop]]

    def append(self, start: int, maps: np.ndarray, raw: np.ndarray | None, ids: list[str],
               labels: np.ndarray, targets: np.ndarray, predictions: np.ndarray) -> None:
        """Write rows ``start:start+len(maps)`` then raise ``n_done`` (after the data)."""
        stop = start + len(maps)
        if start != self.n_done:
            raise AnalysisError(f"internal: append at {start} but n_done is {self.n_done}")
        differ = _first_difference(self.stored_ids(start, stop), ids, offset=start)
        if differ is not None:
            raise AnalysisError(_other_rows_message(self.path, *differ))
        for name, values in (("index", np.asarray(ids, dtype=object)), ("labels", labels),
                             ("targets", targets), ("predictions", predictions)):
            d = self.f[name]
            if d.shape[0] < stop:
                d.resize(stop, axis=0)
            d[start:stop] = values
        self.ds.resize(stop, axis=0)
        self.ds[start:stop] = maps
        if self.raw is not None and raw is not None:
            self.raw.resize(stop, axis=0)
            self.raw[start:stop] = raw
        self.f.flush()
        self.ds.attrs["n_done"] = stop
        self.f.flush()

    def read_rows(self, stop: int, maps: bool = True) -> dict[str, Any]:
        """Rows ``0:stop`` already on disk (for a resumed or complete run); ``maps=False``
        leaves the (large) maps on disk (``maps``/``raw`` are then None)."""
        out = {
            "maps": self.ds[:stop] if maps else None,
            "raw": self.raw[:stop] if self.raw is not None and maps else None,
            "ids": self.stored_ids(0, stop),
            "labels": self.f["labels"][:stop],
            "targets": self.f["targets"][:stop],
            "predictions": self.f["predictions"][:stop],
        }
        return out

    def finish(self) -> None:
        self.ds.attrs["complete"] = True
        group = self.f["attributions"]
        self.f.attrs["complete"] = all(
            bool(group[k].attrs.get("complete", False)) for k in group
            if not k.endswith("_raw")
        )
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()
        self._lock.close()  # after the file: nobody may open it while we still write


#: recorded for CUDA runs since 2026-12 (how float32 convolutions and matmuls rounded)
_PRECISION_KEYS = ("conv_fp32_precision", "matmul_fp32_precision")


def params_match(stored: Any, params: dict[str, Any]) -> bool:
    """Whether a method's stored ``params`` (JSON) are this run's. A CUDA file from before the
    float32 precision was recorded matches without it: how its maps rounded is unknown, as
    for caches from before ``numerics`` (it resumes as before and does not gain the keys)."""
    if stored == _json(params):
        return True
    try:
        old = json.loads(stored)
    except (TypeError, ValueError):
        return False
    if not isinstance(old, dict) or any(k in old for k in _PRECISION_KEYS):
        return False
    return stored == _json({k: v for k, v in params.items() if k not in _PRECISION_KEYS})


def _first_difference(stored: Sequence[str], ids: Sequence[str],
                      offset: int = 0) -> tuple[int, str, str] | None:
    """``(row, stored id, new id)`` of the first row where ``stored`` and ``ids`` disagree
    (rows counted from ``offset``), or None when one is a prefix of the other."""
    for i, (old, new) in enumerate(zip(stored, ids)):
        if old != str(new):
            return offset + i, old, str(new)
    return None


def _other_rows_message(path: Path, row: int, stored: str, new: str) -> str:
    return (f"{path}: row {row} holds image {stored!r} but this run attributes {new!r} "
            "there; the file's maps are of another image sample (n, sample, seed) or data "
            "set. Use another output folder, or overwrite=True / --overwrite to start the "
            "file again (the maps of its other methods are dropped)")


def _open_for_append(path: Path, overwrite: bool) -> h5py.File:
    """Open (or create) the store; a file that HDF5 cannot open (killed in the middle of a
    write, truncated) is refused with the fix, or replaced when ``overwrite``."""
    try:
        return h5py.File(path, "a")
    except OSError as exc:
        if not overwrite or not path.exists():
            raise CacheError(
                f"{path} cannot be opened as HDF5 ({exc}); it was probably cut short by a "
                "killed run. Remove it, choose another output folder, or pass overwrite=True "
                "/ --overwrite to start it again") from None
        path.unlink()
        return h5py.File(path, "a")


def _open_for_read(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(
            f"{path} cannot be opened as HDF5 ({exc}); it was probably cut short by a killed "
            "run: re-run the same command with --overwrite to recompute it") from None


def read_attributions(path: str | Path, method: str | None = None, *,
                      lazy: bool = False) -> dict[str, Any]:
    """Read one method's maps and metadata from ``attributions.h5`` (CacheError when absent).

    ``lazy``: ``maps`` / ``raw`` are :class:`H5Maps` read on access instead of arrays.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "attributions.h5"
    if not path.exists():
        raise CacheError(f"attribution file {path} does not exist; run `interptool attribute`")
    with _open_for_read(path) as f:
        if f.attrs.get("format") != FORMAT:
            raise CacheError(f"{path} is not an interptool attribution file")
        group = f["attributions"]
        methods = [k for k in group if not k.endswith("_raw")]
        if method is None:
            if len(methods) != 1:
                raise AnalysisError(f"{path} holds several methods ({', '.join(methods)}); "
                                    "name one")
            method = methods[0]
        if method not in group:
            raise CacheError(f"{path} has no {method!r} maps; it holds: {', '.join(methods)}")
        ds = group[method]
        if not ds.attrs.get("complete", False):
            raise CacheError(f"{path}: {method!r} maps are incomplete "
                             f"({ds.attrs.get('n_done')} rows); re-run to resume")
        n = int(ds.attrs["n_done"])
        has_raw = f"{method}_raw" in group
        if lazy:
            maps: Any = H5Maps(path, f"attributions/{method}", n)
            raw: Any = H5Maps(path, f"attributions/{method}_raw", n) if has_raw else None
        else:
            maps = ds[:n]
            raw = group[f"{method}_raw"][:n] if has_raw else None
        return {
            "method": method,
            "maps": maps,
            "raw": raw,
            "ids": [s.decode() if isinstance(s, bytes) else str(s) for s in f["index"][:n]],
            "labels": f["labels"][:n],
            "targets": f["targets"][:n],
            "predictions": f["predictions"][:n],
            "params": json.loads(ds.attrs["params"]),
            "reduce": str(ds.attrs["reduce"]),
            "model_info": json.loads(f.attrs["model"]),
            "data_spec": str(f.attrs["data_spec"]),
        }


class H5Maps:
    """Read-only, lazily read rows of one dataset of ``attributions.h5`` (array-like).

    What an :class:`AttributionResult` holds when its maps were written to a file, so that a
    run over many images never keeps all maps in memory. Supports ``shape``, ``dtype``,
    ``ndim``, ``len()``, indexing/slicing (each access opens the file, reads those rows and
    closes it again: no handle is kept open, so the file can be resumed or copied), ``blocks``
    and ``np.asarray`` (reads everything: only for small N). ``keep_alive``: an object kept
    as long as the view (the :class:`TemporaryFolder` of a file written without ``out=``).
    """

    def __init__(self, path: str | Path, name: str, n: int, *,
                 keep_alive: Any = None) -> None:
        self.path = Path(path)
        self.name = name
        # e.g. the TemporaryFolder holding the file: removed only once no view needs it
        self._keep_alive = keep_alive
        with h5py.File(self.path, "r") as f:
            ds = f[name]
            if ds.shape[0] < n:
                raise CacheError(f"{self.path}:{name} holds {ds.shape[0]} rows, expected {n}")
            self.shape = (int(n), *(int(s) for s in ds.shape[1:]))
            self.dtype = ds.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"H5Maps({str(self.path)!r}, {self.name!r}, shape={self.shape})"

    def _rows(self, key: Any) -> Any:
        # clip slices / check indices against n (the file may hold more rows than this run)
        n = self.shape[0]
        if isinstance(key, slice):
            return slice(*key.indices(n))
        if isinstance(key, (int, np.integer)):
            k = int(key) + (n if key < 0 else 0)
            if not 0 <= k < n:
                raise IndexError(f"row {key} out of range for {n} maps")
            return k
        return key

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            key = (self._rows(key[0]), *key[1:])
        else:
            key = self._rows(key)
        first = key[0] if isinstance(key, tuple) else key
        if not isinstance(first, (slice, int)):  # fancy row index: h5py wants it sorted
            idx = np.asarray(first)
            if idx.dtype == bool:
                idx = np.flatnonzero(idx)
            rest = key[1:] if isinstance(key, tuple) else ()
            with h5py.File(self.path, "r") as f:
                uniq, inv = np.unique(idx % self.shape[0], return_inverse=True)
                return f[self.name][uniq.tolist()][(inv, *rest)]
        with h5py.File(self.path, "r") as f:
            return f[self.name][key]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self[:]
        return arr.astype(dtype) if dtype is not None else arr

    def blocks(self, size: int = 256):
        """Yield ``(start, rows)`` blocks of at most ``size`` rows, in order."""
        with h5py.File(self.path, "r") as f:
            ds = f[self.name]
            for s in range(0, self.shape[0], size):
                yield s, ds[s:min(self.shape[0], s + size)]


class TemporaryFolder:
    """A private folder under the system's temporary directory (``TMPDIR``), removed with
    everything in it when the last object referring to it is garbage-collected, at
    interpreter exit, or on :meth:`cleanup`.

    Holds the ``attributions.h5`` that ``Attribution.run(out=None)`` streams large runs to;
    every :class:`H5Maps` view of that file refers to it, so the file lives exactly as long
    as some view can still read it (tied to the views rather than the result: ``maps =
    res.maps; del res`` must keep working). ``weakref.finalize`` rather than
    ``tempfile.TemporaryDirectory``, whose implicit clean-up warns (ResourceWarning) on
    every normal end of life here.
    """

    def __init__(self, prefix: str = "interptool-attributions-") -> None:
        self.path = Path(tempfile.mkdtemp(prefix=prefix))
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path),
                                           ignore_errors=True)

    def cleanup(self) -> None:
        self._finalizer()

    # one folder, one owner: a copy of a view (copy.deepcopy of a result) must keep this
    # folder alive, not hold an unowned path that vanishes with the original
    def __copy__(self) -> TemporaryFolder:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> TemporaryFolder:
        return self

    def __repr__(self) -> str:
        return f"TemporaryFolder({str(self.path)!r})"
