"""Decoded probe masks kept on disk between runs (``Dissection(mask_store=FOLDER)``).

Why: decoding a probe's mask PNGs is about half of the dissection's CPU time on a CPU and
sets the pace on a GPU (one core decodes ~1,000 probe images/s of Broden's geometry, five
PNGs each), and a study dissects the same probe for every model, layer and random-init
control. With a store the masks are decoded once per probe, categories and mask files; later
runs, in any process, read the label tables back (2 bytes per mask pixel) instead.

One file per key, ``FOLDER/<key>.masks``. The key is the sha256 of the format version, the
probe's fingerprint and size, the categories, its ``segmentation_digest()`` (sizes and
``index.csv`` cells) and every mask file's category, path, size and modification time, so a
probe changed on disk gets a new file and an old one is never read for it. A file is written under a hidden partial name and renamed when whole (fsynced
first), so an interrupted run, a full disk or a second writer never leaves a file that
looks whole; a partial left by a killed process of this host is removed by the next writer.
Every block carries a CRC-32 and the index one of its own, so a damaged file is an error
naming it, never silently different numbers; each image's label counts are also checked for
their total and range against its table. A file that does not match (another format, key or
sizes) is ignored and written again, and no file can make the reader allocate without bound
(see the limits below). What it does not guard against is someone who can write the folder
rewriting a file with valid checksums: such a person could as well change the probe.

Layout (little-endian), written front to back::

    b"ITMASKS1"
    blocks, one per decoded batch (split at _MAX_BLOCK bytes): its images' label tables
        (uint16 or int32, pixel-major), then their image-level labels (int64), then their
        label counts (int64)
    index: int64 (n, 5): sh, sw, planes, image-level labels, label counts per image
    JSON: format, version, key, n_items, dtype, blocks [[first image, images, offset,
        bytes, crc32], ...], categories, probe spec
    trailer: index offset (uint64), JSON bytes (uint64), CRC-32 of index + JSON (uint32),
        b"ITMASKS1"

Why not HDF5 (the cache's format): a write-once file needs no random access, and HDF5
crashed the process (a segmentation fault in ``File.close``) closing a file whose writes had
failed on a full disk (reproduced on a 1 MiB tmpfs); plain writes fail cleanly.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from interptool._workers import Prefetch
from interptool.analyzers.dissection._tally import SegItem
from interptool.errors import AnalysisError

FORMAT = "interptool-mask-store"
VERSION = 1
MAGIC = b"ITMASKS1"
SUFFIX = ".masks"
_TRAILER = struct.Struct("<QQI8s")


# what a store file may claim, whatever its CRCs say (sizes must also be the probe's, label
# counts at most the probe's labels): a pixel's planes and an image's image-level labels far
# beyond any probe's, a block (one decoded batch, split when larger) and the index of bounded
# size, so that a crafted file cannot make the reader allocate without bound: at most about
# three times _MAX_BLOCK (the block, its int32 tables) plus the index. The writer keeps to
# the same bounds (a probe beyond them is decoded every run, and told so).
_MAX_SIDE = 65535
_MAX_PLANES = 256
_MAX_SCALARS = 1 << 12
_MAX_LABELS = 1 << 24
_MAX_BLOCK = 256 << 20
_MAX_TEXT = 64 << 20

# partial files this process is writing now (any other partial of this host whose process is
# gone, or that carries this process's id without being one of these, is stale)
_WRITING: set[str] = set()


def store_key(files_state: str, probe: Any, categories: list[str]) -> str | None:
    """The store file's name (without its suffix) for a probe, its categories and the state of
    its mask files (:func:`~interptool.analyzers.dissection._analyzer._mask_files_state`);
    None when the probe does not describe its segmentations (``segmentation_digest()``:
    sizes and ``index.csv`` cells), so a stored copy could not be told from a stale one."""
    describe = getattr(probe, "segmentation_digest", None)
    if describe is None:
        return None
    ident = {"format": FORMAT, "version": VERSION, "files": files_state,
             "segmentations": describe(),
             "fingerprint": getattr(probe, "fingerprint", None), "n": len(probe),
             "num_labels": int(getattr(probe, "num_labels", 0)),
             "categories": list(categories)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class StorePlan:
    """What a run does with the store: read a whole file, write one, or neither (``why``)."""

    folder: str
    file: str | None = None
    action: str = "none"  # "read", "write" or "none"
    why: str = ""
    reader: StoreReader | None = None
    ahead: Prefetch | None = None  # the thread reading ahead from ``reader``
    writer: StoreWriter | None = None
    written: bool = False
    notes: list[str] = field(default_factory=list)

    def release(self) -> None:
        """Remove a partial file this run did not finish and close a file it read from: the
        run ended, possibly before its first batch of masks (then the generators that would
        have done it never started)."""
        if self.writer is not None and not self.written:
            self.writer.abort()
        if self.ahead is not None:
            self.ahead.close()  # the thread first: it reads from the file
        if self.reader is not None:
            self.reader.close()

    def record(self) -> dict[str, Any]:
        """``result.config["segmentations"]``: where this run's masks came from."""
        if self.action == "read":
            source = "read from the store"
        elif self.action == "write":
            source = "decoded and stored" if self.written else f"decoded; not stored: {self.why}"
        else:
            source = f"decoded; store not used: {self.why}"
        return {"source": source, "store_file": self.file}


def plan_store(folder: str | os.PathLike, key: str | None, probe: Any, categories: list[str],
               table_bytes: int) -> StorePlan:
    """Open ``FOLDER/<key>.masks`` for reading when it is whole and matches, else prepare a
    writer (when the folder can be written and has room for the label tables: at least
    ``table_bytes`` as int32, half of it as uint16).

    ``key`` None: the probe does not list its mask files or describe its segmentations, so
    a stored copy could not be told from a stale one; nothing is read or written."""
    from interptool._provenance import device_of, free_bytes

    folder = Path(folder)
    plan = StorePlan(str(folder))
    if key is None:
        plan.why = ("the probe does not list its mask files and segmentations (a stored copy "
                    "could go stale)")
        return plan
    path = folder / f"{key}{SUFFIX}"
    plan.file = str(path)
    n = len(probe)
    num_labels = int(getattr(probe, "num_labels", 1 << 30))
    if path.is_file():
        reader, why = StoreReader.open(path, key, n, _expected_sizes(probe), num_labels)
        if reader is not None:
            plan.action, plan.reader = "read", reader
            return plan
        plan.notes.append(f"{path} ignored ({why}); decoding and storing it again")
    dtype = np.dtype(np.uint16 if num_labels <= 1 << 16 else np.int32)
    min_bytes = table_bytes * dtype.itemsize // 4
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(folder)
        free = free_bytes(folder)
    except OSError as exc:
        plan.why = f"cannot write to {folder} ({exc.strerror or exc})"
        return plan
    if free < min_bytes:
        plan.why = (f"needs at least {min_bytes / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free "
                    f"on {device_of(folder)}")
        return plan
    try:
        plan.writer = StoreWriter(path, key, n, dtype, num_labels, {
            "probe_spec": str(getattr(probe, "spec", "") or ""), "categories": categories})
    except OSError as exc:
        plan.why = f"cannot write to {folder} ({exc})"
        return plan
    plan.action = "write"
    return plan


def _expected_sizes(probe: Any) -> np.ndarray | None:
    """(n, 2) segmentation sizes the probe states, to check a store's index against."""
    seg_size = getattr(probe, "seg_size", None)
    if seg_size is None:
        return None
    return np.asarray([seg_size(i) for i in range(len(probe))], dtype=np.int64).reshape(-1, 2)


def _partial_name(name: str) -> str:
    # the host and process say whose it is; the random part keeps a file left by a killed
    # process that had this process's id (a container restarted with the same hostname) from
    # ever blocking this one
    return f".{name}.partial-{socket.gethostname()}-{os.getpid()}-{os.urandom(4).hex()}"


def _remove_stale_partials(folder: Path) -> None:
    """Remove the partial files in ``folder`` (of any key) left by processes of this host that
    are gone, and by this process when it is not writing them now."""
    host = socket.gethostname()
    for p in folder.glob(f".*{SUFFIX}.partial-*"):
        owner = p.name.rpartition(".partial-")[2]
        who, _, token = owner.rpartition("-")
        h, _, pid = who.rpartition("-")
        if h != host or not (pid.isascii() and pid.isdigit()) or len(pid) > 9 or not token:
            continue  # another host's writer (it may still run), or not a name of ours
        if int(pid) == os.getpid():
            stale = str(p) not in _WRITING
        else:
            try:
                os.kill(int(pid), 0)
                stale = False
            except ProcessLookupError:
                stale = True
            except OSError:
                stale = False  # alive (another user's process: PermissionError)
        if stale:
            try:
                p.unlink()
            except OSError:
                pass  # not ours to remove (a shared folder), or gone: it blocks no key


class StoreWriter:
    """Appends decoded batches to a hidden partial file; :meth:`commit` makes it whole."""

    def __init__(self, path: Path, key: str, n_items: int, dtype: Any, num_labels: int,
                 meta: dict[str, Any]) -> None:
        self.path = path
        self.tmp = path.with_name(_partial_name(path.name))
        self.n_items = n_items
        self.dtype = np.dtype(dtype)
        # no label outside the probe's is stored (the tally refuses such an item, and the
        # counts of a negative one leave out the plane that holds it): the store holds only
        # what a run can count, so reading one back is a damaged file, not a bad mask
        self._top = min(int(np.iinfo(self.dtype).max), num_labels - 1)
        self.meta = {"format": FORMAT, "version": VERSION, "key": key, "n_items": n_items,
                     "dtype": self.dtype.str, **meta}
        self._index: list[tuple[int, int, int, int, int]] = []
        self._blocks: list[list[int]] = []
        self._fh = open(self.tmp, "xb")  # noqa: SIM115 - held open across batches
        _WRITING.add(str(self.tmp))
        self._at = 0
        try:
            self._write(MAGIC)
        except BaseException:
            self.abort()
            raise

    def _write(self, data: bytes | memoryview) -> None:
        self._fh.write(data)
        self._at += len(data)

    def add(self, items: list[SegItem]) -> str | None:
        """Append a batch (in probe order), in blocks of at most ``_MAX_BLOCK`` bytes; or say
        why an image cannot be stored (a label outside the probe's, which the tally refuses
        anyway; more planes, image-level labels or bytes than a store file may claim)."""
        sizes = []
        for k, it in enumerate(items):
            depth = it.pixel.shape[1] if it.pixel.ndim == 2 else 0
            nbytes = it.pixel.size * self.dtype.itemsize + 8 * (it.scalars.size
                                                                  + it.label_counts.size)
            why = ("images out of order" if it.index != len(self._index) + k else
                   f"a label number outside 0..{self._top}" if it.lo < 0 or it.hi > self._top
                   else f"more than {_MAX_PLANES} mask planes" if depth > _MAX_PLANES
                   else f"a side over {_MAX_SIDE} pixels" if max(it.size) > _MAX_SIDE
                   else f"more than {_MAX_SCALARS} image-level labels"
                   if it.scalars.size > _MAX_SCALARS
                   else f"over {_MAX_BLOCK >> 20} MiB of tables" if nbytes > _MAX_BLOCK
                   else None)
            if why:
                return f"probe image {it.index} has {why}" if why != "images out of order" \
                    else why
            sizes.append(nbytes)
        start = 0
        while start < len(items):  # the most items from `start` that fit in one block
            end, total = start, 0
            while end < len(items) and total + sizes[end] <= _MAX_BLOCK:
                total += sizes[end]
                end += 1
            self._add_block(items[start:end])
            start = end
        return None

    def _add_block(self, items: list[SegItem]) -> None:
        block = b"".join(
            [np.ascontiguousarray(it.pixel, dtype=self.dtype).tobytes() for it in items]
            + [np.ascontiguousarray(it.scalars, dtype="<i8").tobytes() for it in items]
            + [np.ascontiguousarray(it.label_counts, dtype="<i8").tobytes() for it in items])
        self._blocks.append([len(self._index), len(items), self._at, len(block),
                             zlib.crc32(block)])
        self._write(block)
        for it in items:
            depth = it.pixel.shape[1] if it.pixel.ndim == 2 else 0
            self._index.append((it.size[0], it.size[1], depth, len(it.scalars),
                                len(it.label_counts)))

    @property
    def complete(self) -> bool:
        return len(self._index) == self.n_items

    def commit(self) -> None:
        """Write the index and trailer, fsync, and rename the file to its name (whole, or
        not at all)."""
        from interptool._provenance import fsync_dir

        try:
            index = np.asarray(self._index, dtype="<i8").reshape(-1, 5).tobytes()
            text = json.dumps({**self.meta, "blocks": self._blocks}).encode()
            at = self._at
            self._write(index)
            self._write(text)
            self._write(_TRAILER.pack(at, len(text), zlib.crc32(index + text), MAGIC))
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        _WRITING.discard(str(self.tmp))
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Close and remove the partial file (errors ignored: this runs on failure paths)."""
        try:
            self._fh.close()
        except OSError:
            pass  # the buffered tail failed to write (a full disk): the file goes anyway
        try:
            self.tmp.unlink()
        except OSError:
            pass
        _WRITING.discard(str(self.tmp))


class StoreReader:
    """A whole store file, its index in memory, read back block by block."""

    def __init__(self, path: Path, fh: Any, index: np.ndarray, meta: dict[str, Any],
                 num_labels: int) -> None:
        self.path = path
        self.fh = fh
        self.index = index
        self.meta = meta
        self.dtype = np.dtype(meta["dtype"])
        self.num_labels = num_labels

    @classmethod
    def open(cls, path: Path, key: str, n_items: int, sizes: np.ndarray | None = None,
             num_labels: int = _MAX_LABELS) -> tuple[StoreReader | None, str]:
        """``(reader, "")``, or ``(None, why)`` when the file is not a whole store of this
        key, size and segmentation ``sizes`` (the probe's, when it states them) or its index
        is inconsistent: whatever the file holds, nothing but that answer comes out."""
        try:
            fh = open(path, "rb")  # noqa: SIM115 - held open while the batches are read
        except OSError as exc:
            return None, f"not readable ({exc.strerror or exc})"
        try:
            index, meta, why = cls._read_index(fh, key, n_items, sizes, num_labels)
        except (Exception, RecursionError) as exc:  # noqa: BLE001 - any malformed content
            index, meta, why = None, None, f"unreadable index ({type(exc).__name__})"
        if why:
            fh.close()
            return None, why
        return cls(path, fh, index, meta, num_labels), ""

    @staticmethod
    def _read_index(fh: Any, key: str, n: int, sizes: np.ndarray | None,
                    num_labels: int) -> tuple[Any, Any, str]:
        size = os.fstat(fh.fileno()).st_size
        if size < len(MAGIC) + _TRAILER.size:
            return None, None, "too short to be a store"
        fh.seek(size - _TRAILER.size)
        at, n_text, crc, magic = _TRAILER.unpack(fh.read(_TRAILER.size))
        fh.seek(0)
        if fh.read(len(MAGIC)) != MAGIC or magic != MAGIC:
            return None, None, f"not a {FORMAT} file (or not complete)"
        if not len(MAGIC) <= at <= size - _TRAILER.size - n_text or n * 40 + n_text != \
                size - _TRAILER.size - at or n_text > _MAX_TEXT:
            return None, None, "index outside the file"
        fh.seek(at)
        raw = fh.read(size - _TRAILER.size - at)
        if zlib.crc32(raw) != crc:
            return None, None, "index damaged (CRC-32)"
        meta = json.loads(raw[n * 40 :])
        if not isinstance(meta, dict):
            return None, None, "index malformed"
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            return None, None, f"not a {FORMAT} file of version {VERSION}"
        if meta.get("key") != key or meta.get("n_items") != n:
            return None, None, "made for other masks"
        if meta.get("dtype") not in ("<u2", "<i4"):
            return None, None, f"label tables of type {meta.get('dtype')!r}"
        index = np.frombuffer(raw[: n * 40], dtype="<i8").reshape(n, 5).astype(np.int64)
        if (index < 0).any() or (index[:, :2] > _MAX_SIDE).any() \
                or (index[:, 2] > _MAX_PLANES).any() or (index[:, 3] > _MAX_SCALARS).any() \
                or (index[:, 4] > min(num_labels, _MAX_LABELS)).any():
            return None, None, "sizes in the index out of range"
        if sizes is not None and not np.array_equal(index[:, :2], sizes):
            return None, None, "segmentation sizes differ from the probe's"
        # bounded above, so these products cannot overflow int64
        item_bytes = (index[:, 0] * index[:, 1] * index[:, 2] * np.dtype(meta["dtype"]).itemsize
                      + 8 * (index[:, 3] + index[:, 4]))
        blocks = meta.get("blocks")
        if not isinstance(blocks, list):
            return None, None, "index malformed"
        expect_item, expect_at = 0, len(MAGIC)
        for block in blocks:
            if not (isinstance(block, list) and len(block) == 5
                    and all(type(v) is int for v in block)):
                return None, None, "index malformed"
            first, count, offset, nbytes, _ = block
            if first != expect_item or count < 1 or first + count > n or offset != expect_at \
                    or nbytes > _MAX_BLOCK \
                    or nbytes != int(item_bytes[first : first + count].sum()):
                return None, None, "blocks do not tile the file"
            expect_item, expect_at = first + count, offset + nbytes
        if expect_item != n or expect_at != at:
            return None, None, "blocks do not tile the file"
        return index, meta, ""

    def batches(self, batch_size: int) -> Iterator[list[SegItem]]:
        """The items in probe order, ``batch_size`` at a time (one read per block)."""
        pending: list[SegItem] = []
        for block in self.meta["blocks"]:
            pending += self._read_block(*(int(v) for v in block))
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
        if pending:
            yield pending

    def _damaged(self, what: str) -> AnalysisError:
        return AnalysisError(f"{self.path}: the mask store file is damaged ({what}); delete it "
                             "and run again")

    def _read_block(self, first: int, count: int, offset: int, nbytes: int,
                    crc: int) -> list[SegItem]:
        try:
            return self._items(first, count, offset, nbytes, crc)
        except AnalysisError:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed content the index let through
            raise self._damaged(f"images {first}-{first + count - 1}: {exc}") from None

    def _items(self, first: int, count: int, offset: int, nbytes: int,
               crc: int) -> list[SegItem]:
        self.fh.seek(offset)
        raw = self.fh.read(nbytes)
        if len(raw) != nbytes or zlib.crc32(raw) != crc:
            raise self._damaged(f"block of images {first}-{first + count - 1} fails its "
                                "CRC-32")
        ix = self.index[first : first + count]
        n_pix = ix[:, 0] * ix[:, 1] * ix[:, 2]
        stored = np.frombuffer(raw, self.dtype, int(n_pix.sum()))
        pixel = stored.astype(np.int32)
        signed = self.dtype.kind == "i"
        ints = np.frombuffer(raw, "<i8", offset=int(n_pix.sum()) * self.dtype.itemsize)
        p_at = np.concatenate([[0], np.cumsum(n_pix)])
        s_at = np.concatenate([[0], np.cumsum(ix[:, 3])])
        c_at = int(s_at[-1]) + np.concatenate([[0], np.cumsum(ix[:, 4])])
        items = []
        for k in range(count):
            sh, sw, depth = (int(v) for v in ix[k, :3])
            px = pixel[p_at[k] : p_at[k + 1]].reshape(sh * sw, depth)
            sc = ints[s_at[k] : s_at[k + 1]].astype(np.int64)
            cn = ints[c_at[k] : c_at[k + 1]].astype(np.int64)
            # the counts must describe the table exactly (label areas are IoU denominators);
            # the extremes are taken on the stored (2-byte) labels: half the memory to scan
            raw_px = stored[p_at[k] : p_at[k + 1]]
            if (cn < 0).any() or int(cn.sum()) != px.size or (raw_px.size and (
                    int(raw_px.max()) >= len(cn) or (signed and int(raw_px.min()) < 0))):
                raise self._damaged(f"image {first + k}'s label counts do not match its "
                                    "label table")
            lo = min(0, int(sc.min(initial=0)))
            hi = max(len(cn) - 1, int(sc.max(initial=0)))
            if lo < 0 or hi >= self.num_labels:  # decoding would have refused such a mask
                raise self._damaged(f"image {first + k} holds label number "
                                    f"{lo if lo < 0 else hi}, outside the probe's "
                                    f"0..{self.num_labels - 1}")
            items.append(SegItem(first + k, (sh, sw), px, sc, cn, lo, hi))
        return items

    def close(self) -> None:
        self.fh.close()
