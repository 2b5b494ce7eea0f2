"""The dissection's mask store: decoded masks written once and read back by later runs with
identical results; a changed probe, a damaged or foreign file, a killed writer, a full disk
and two writers at once, each reproduced."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_cache_faults import SmallFS  # noqa: E402
from test_dissection_bootstrap import write_random_broden  # noqa: E402
from test_dissection_workers import DuckProbe  # noqa: E402

from interptool.analyzers.dissection import Dissection  # noqa: E402
from interptool.cache import write_cache  # noqa: E402
from interptool.cli import main  # noqa: E402
from interptool.data import open_dataset  # noqa: E402
from interptool.errors import AnalysisError, DataError  # noqa: E402

RESULTS = ("intersect", "label_area", "unit_cat_area", "iou", "thresholds", "top_images",
           "top_maps")
KW = dict(quantile=0.2, batch_size=4, checksum=False, workers=0)


@pytest.fixture
def world(tmp_path):
    """A 14-image Broden folder of our own (its files may be changed) and a cache on it."""
    root = write_random_broden(tmp_path / "broden")
    probe = open_dataset(f"broden:{root}")
    rng = np.random.default_rng(5)
    feats = rng.random((len(probe), 6, 4, 4)).astype(np.float32)
    cache = write_cache(tmp_path / "c.h5", logits=np.zeros((len(probe), 2)), ids=probe.ids,
                        features={"l4": feats},
                        attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
    return root, cache


def _probe(root: Path):
    return open_dataset(f"broden:{root}")  # a fresh object: nothing memoised in it


def _no_decoding(probe):
    def refuse(i):
        raise AssertionError(f"segmentation {i} decoded")
    probe.load_segmentation = refuse
    return probe


def _same(a, b) -> None:
    for name in RESULTS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), name)


def _files(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def test_written_once_then_read_back_with_identical_results(world, tmp_path):
    root, cache = world
    store = tmp_path / "store"
    plain = Dissection(bootstrap=50, seed=1, **KW).run(cache, "l4", _probe(root))
    first = Dissection(mask_store=store, bootstrap=50, seed=1, **KW).run(cache, "l4",
                                                                        _probe(root))
    assert first.config["segmentations"]["source"] == "decoded and stored"
    [name] = _files(store)  # one whole file, no partial left
    assert name.endswith(".masks") and first.config["segmentations"]["store_file"] == str(store / name)
    # another process-level run: read back, nothing decoded, other batches, workers asked
    again = Dissection(mask_store=store, bootstrap=50, seed=1,
                       **{**KW, "batch_size": 3, "workers": 2}).run(
        cache, "l4", _no_decoding(_probe(root)))
    assert again.config["segmentations"]["source"] == "read from the store"
    assert again.config["threads"]["mask_workers"] == 0  # nothing to decode
    assert again.config["segmentations"]["store_file"] == str(store / name)
    for r in (first, again):
        _same(r, plain)
        assert r.bootstrap_samples.equals(plain.bootstrap_samples)
    raw = (store / name).read_bytes()  # what the file says it is (documented layout)
    assert raw[:8] == raw[-8:] == b"ITMASKS1"
    _, n_text, _, _ = struct.unpack("<QQI8s", raw[-28:])
    meta = json.loads(raw[len(raw) - 28 - n_text : len(raw) - 28])
    assert meta["n_items"] == 14 and meta["dtype"] == "<u2"
    assert meta["categories"] == first.categories


def test_other_categories_or_a_changed_mask_file_get_their_own_file(world, tmp_path):
    root, cache = world
    store = tmp_path / "store"
    Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    Dissection(mask_store=store, categories="object", **KW).run(cache, "l4", _probe(root))
    assert len(_files(store)) == 2
    mask = root / "images" / "im3_o.png"
    st = mask.stat()
    os.utime(mask, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a mask changed on disk
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"
    assert len(_files(store)) == 3
    # index.csv edited, no mask file touched: a scene label, a mask moved to another
    # category's column, a constant plane, a row's segmentation size
    index = root / "index.csv"
    text = index.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("im0.jpg"))
    image, split, ih, iw, sh, sw, color, obj, scene = row.split(",")
    edits = [f"{image},{split},{ih},{iw},{sh},{sw},{color},{obj},{5 if scene != '5' else 6}",
             f"{image},{split},{ih},{iw},{sh},{sw},,{color};{obj},{scene}",
             f"{image},{split},{ih},{iw},{sh},{sw},{color};4,{obj},{scene}"]
    for k, edited in enumerate(edits):
        index.write_text(text.replace(row, edited))
        plain = Dissection(**KW).run(cache, "l4", _probe(root))
        r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
        assert r.config["segmentations"]["source"] == "decoded and stored", edited
        _same(r, plain)
        assert len(_files(store)) == 4 + k
    # a size that no longer matches the masks: the same error as without a store
    index.write_text(text.replace(row, f"{image},{split},{ih},{iw},8,8,{color},{obj},{scene}"))
    with pytest.raises(DataError, match=r"im0_c\.png .* is 4x4 but sh,sw = 8,8"):
        Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))


def test_a_probe_that_does_not_list_its_mask_files_is_decoded_and_said(world, tmp_path,
                                                                      capsys):
    root, cache = world
    # without mask_files() and segmentation_digest() a stored copy could go stale
    r = Dissection(mask_store=tmp_path / "store", **KW).run(cache, "l4",
                                                            DuckProbe(_probe(root)))
    assert "does not list its mask files" in r.config["segmentations"]["source"]
    assert "not used" in capsys.readouterr().err
    assert _files(tmp_path / "store") == []
    _same(r, Dissection(**KW).run(cache, "l4", _probe(root)))


def _stored(world, tmp_path) -> tuple[Path, Path, object]:
    root, cache = world
    store = tmp_path / "store"
    ref = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    [name] = _files(store)
    return store, store / name, ref


def _rewrite(path: Path, edit) -> None:
    """Rewrite a store file after ``edit(blocks: bytearray, index, meta)`` with every CRC-32
    made valid again (read here from the documented layout, not with interptool's reader):
    only interptool's own consistency checks can then find what was changed."""
    raw = path.read_bytes()
    at, n_text, _, magic = struct.unpack("<QQI8s", raw[-28:])
    assert raw[:8] == magic == b"ITMASKS1"
    meta = json.loads(raw[len(raw) - 28 - n_text : len(raw) - 28])
    index = np.frombuffer(raw[at : len(raw) - 28 - n_text], "<i8").reshape(-1, 5).copy()
    body = bytearray(raw[8:at])
    edit(body, index, meta)
    for b in meta["blocks"]:
        b[4] = zlib.crc32(bytes(body[b[2] - 8 : b[2] - 8 + b[3]]))
    text, ix = json.dumps(meta).encode(), index.astype("<i8").tobytes()
    path.write_bytes(b"ITMASKS1" + bytes(body) + ix + text + struct.pack(
        "<QQI8s", 8 + len(body), len(text), zlib.crc32(ix + text), b"ITMASKS1"))


def test_a_foreign_or_inconsistent_file_is_ignored_and_written_again(world, tmp_path, capsys):
    root, cache = world
    store, path, ref = _stored(world, tmp_path)

    def swap_blocks(body, index, meta):
        meta["blocks"][0][2] += 1  # a block that does not start where the previous ended

    def other_key(body, index, meta):
        meta["key"] = "0" * 32

    def bigger_image(body, index, meta):
        index[2, 0] += 1  # sizes no longer add up to the blocks' bytes

    for spoil in ("garbage", "cut", "blocks", "key", "sizes"):
        if spoil == "garbage":
            path.write_bytes(b"garbage" * 100)
        elif spoil == "cut":  # a file that stopped short (no trailer) under the final name
            path.write_bytes(path.read_bytes()[:-30])
        else:
            _rewrite(path, {"blocks": swap_blocks, "key": other_key,
                            "sizes": bigger_image}[spoil])
        r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
        assert r.config["segmentations"]["source"] == "decoded and stored", spoil
        assert f"{path} ignored" in capsys.readouterr().err, spoil
        _same(r, ref)
        assert _files(store) == [path.name]
        again = Dissection(mask_store=store, **KW).run(cache, "l4", _no_decoding(_probe(root)))
        assert again.config["segmentations"]["source"] == "read from the store", spoil


@pytest.mark.parametrize("craft", ["json list", "deep json", "infinite offset",
                                   "huge side", "wrapping sizes", "empty huge image",
                                   "many image-level labels"])
def test_a_crafted_index_is_ignored_without_allocating(world, tmp_path, capsys, craft):
    """Index contents with valid CRC-32s that would crash the reader or make it (or the
    tally) allocate without bound: the file is ignored and written again."""
    root, cache = world
    store, path, ref = _stored(world, tmp_path)
    raw = path.read_bytes()
    at, n_text, _, _ = struct.unpack("<QQI8s", raw[-28:])
    if craft in ("json list", "deep json", "infinite offset"):
        meta = json.loads(raw[len(raw) - 28 - n_text : len(raw) - 28])
        text = {"json list": b"[1, 2]", "deep json": b"[" * 100_000 + b"]" * 100_000,
                "infinite offset": json.dumps(meta).replace(
                    f"[0, 4, 8, {meta['blocks'][0][3]}",
                    f"[0, 4, Infinity, {meta['blocks'][0][3]}").encode()}[craft]
        ix = raw[at : len(raw) - 28 - n_text]
        path.write_bytes(raw[:at] + ix + text + struct.pack(
            "<QQI8s", at, len(text), zlib.crc32(ix + text), b"ITMASKS1"))
    else:
        def edit(body, index, meta):
            if craft == "huge side":
                index[0, :2] = 1 << 20
            elif craft == "wrapping sizes":  # products that wrap around int64 to the truth
                index[0, :3] = (1 << 31, 1 << 31, 1 << 2)
            elif craft == "many image-level labels":
                index[0, 3] = 1 << 23
            else:  # no planes: an empty table of 2^40 pixels would pass every count check
                index[0, :3] = (1 << 20, 1 << 20, 0)
        _rewrite(path, edit)
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"
    assert f"{path} ignored" in capsys.readouterr().err
    _same(r, ref)


def test_damaged_data_is_an_error_naming_the_file(world, tmp_path):
    root, cache = world
    store, path, ref = _stored(world, tmp_path)
    # 1. a flipped byte inside a label table: the block's CRC-32 fails on read
    raw = bytearray(path.read_bytes())
    raw[8 + 7] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(AnalysisError, match=rf"{path}: the mask store file is damaged \(block "
                                            r"of images 0-3 fails its CRC-32\); delete it"):
        Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    # 2. a label count changed, every CRC-32 valid: the counts no longer describe the table
    path.unlink()
    Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))

    def more_of_label_0(body, index, meta):
        n_pix = int((index[:4, 0] * index[:4, 1] * index[:4, 2]).sum())
        at = 2 * n_pix + 8 * int(index[:4, 3].sum())  # image 0's first label count
        count = np.frombuffer(bytes(body[at : at + 8]), "<i8")[0]
        body[at : at + 8] = np.array([count + 1], "<i8").tobytes()

    _rewrite(path, more_of_label_0)
    with pytest.raises(AnalysisError, match=r"image 0's label counts do not match"):
        Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    # 3. an image-level label beyond the probe's: the store is blamed (decoding would have
    # refused it), not a mask file
    path.unlink()
    Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    at_image = {}

    def scene_9(body, index, meta):
        k = next(k for k in range(4) if index[k, 3])  # an image of block 0 with a scene
        at = 2 * int((index[:4, 0] * index[:4, 1] * index[:4, 2]).sum()) \
            + 8 * int(index[:k, 3].sum())
        body[at : at + 8] = np.array([9], "<i8").tobytes()
        at_image["k"] = k

    _rewrite(path, scene_9)
    with pytest.raises(AnalysisError, match=rf"{path}: the mask store file is damaged \(image "
                                            rf"{at_image['k']} holds label number 9, outside "
                                            "the probe's 0..6"):
        Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    # 4. label counts longer than the probe's labels: not a store of this probe
    path.unlink()
    Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))

    def long_counts(body, index, meta):
        index[0, 4] = 8

    _rewrite(path, long_counts)
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"


CHILD = """
import os, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from interptool.analyzers.dissection import Dissection
from interptool.data import open_dataset
probe = open_dataset("broden:{root}")
real = probe.load_segmentation
def held(i):
    # image 6 (two batches of 4 stored) waits for the gate file: the partial file exists
    if i == 6:
        open({marker!r} + str(os.getpid()), "w").close()
        while not os.path.exists({gate!r}):
            time.sleep(0.01)
    return real(i)
probe.load_segmentation = held
r = Dissection(mask_store={store!r}, quantile=0.2, batch_size=4, checksum=False,
               workers=0).run({cache!r}, "l4", probe)
print(r.config["segmentations"]["source"])
"""


def _children(tmp_path: Path, root: Path, cache: Path, store: Path, n: int):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent), root=root,
                                   marker=str(tmp_path / "at6."), gate=str(tmp_path / "gate"),
                                   store=str(store), cache=str(cache)))
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(n)]
    # a hang guard, not a timing assertion: each child only has to get there eventually
    deadline = time.monotonic() + 300
    while len(list(tmp_path.glob("at6.*"))) < n:
        for p in procs:
            assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "children never reached image 6"
        time.sleep(0.01)
    return procs


def test_a_killed_writer_leaves_no_whole_file_and_its_partial_is_removed(world, tmp_path):
    root, cache = world
    store = tmp_path / "store"
    [proc] = _children(tmp_path, root, cache, store, 1)
    partial = _files(store)
    assert len(partial) == 1 and partial[0].startswith(".") and ".partial-" in partial[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reaped, its pipes closed
    assert _files(store) == partial  # nothing looks whole
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"
    assert _files(store) == [Path(r.config["segmentations"]["store_file"]).name]  # the stale one went
    _same(r, Dissection(**KW).run(cache, "l4", _probe(root)))


def test_a_run_failing_before_its_first_masks_leaves_nothing_behind(world, tmp_path):
    """NaN activations stop the run in the threshold pass, before the store's writer has
    seen a batch: its partial file is removed and its handle closed, so the next run in the
    same process (a notebook) stores the masks."""
    root, cache = world
    store = tmp_path / "store"
    bad = tmp_path / "bad.h5"
    shutil.copy(cache, bad)
    with h5py.File(bad, "r+") as f:
        name = next(k for k in f["features"] if k.startswith("l4") and "max" not in k)
        f["features"][name][0, 0, 0, 0] = np.nan
    with pytest.raises(AnalysisError, match="NaN"):
        Dissection(mask_store=store, **KW).run(bad, "l4", _probe(root))
    assert _files(store) == []
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"


def test_a_partial_with_this_process_id_is_not_an_obstacle(world, tmp_path):
    """A partial left by a killed process that had this process's id (a container restarted
    with the same hostname) is stale: removed, and the store written."""
    import socket

    root, cache = world
    store = tmp_path / "store"
    store.mkdir()
    plain = Dissection(**KW).run(cache, "l4", _probe(root))
    key = Path(Dissection(mask_store=tmp_path / "other", **KW).run(
        cache, "l4", _probe(root)).config["segmentations"]["store_file"]).name
    host = socket.gethostname()
    left = store / f".{key}.partial-{host}-{os.getpid()}-0badf00d"
    left.write_bytes(b"ITMASKS1 half")
    # names that are not a live writer's, and one that cannot be removed: skipped, no error
    odd = [f".{key}.partial-{host}-{'9' * 20}-cc", f".{key}.partial-{host}-\u00b2-cc",
           f".other{key[5:]}.masks.partial-{host}-{os.getpid()}-feed"]
    for name in odd:
        (store / name).write_bytes(b"x")
    (store / odd[-1]).unlink()
    (store / odd[-1]).mkdir()  # unlink() fails on it
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"
    assert _files(store) == sorted([key, *odd])
    _same(r, plain)


def test_a_run_whose_mask_workers_fail_to_start_leaves_nothing_behind(world, tmp_path,
                                                                      monkeypatch):
    root, cache = world
    store = tmp_path / "store"

    def no_memory(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    with monkeypatch.context() as m:
        m.setattr(Dissection, "_decode_segmentations", no_memory)
        with pytest.raises(OSError, match="Cannot allocate memory"):
            Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert _files(store) == []
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == "decoded and stored"


def test_large_batches_are_stored_in_bounded_blocks(world, tmp_path, monkeypatch):
    """A block (what a reader allocates at once) holds at most _MAX_BLOCK bytes: a batch
    larger than that is split, and read back the same."""
    import interptool.analyzers.dissection._mask_store as ms

    root, cache = world
    store = tmp_path / "store"
    monkeypatch.setattr(ms, "_MAX_BLOCK", 200)  # a 4x4 image with 2 planes: ~100 bytes
    plain = Dissection(**KW).run(cache, "l4", _probe(root))
    first = Dissection(mask_store=store, **{**KW, "batch_size": 14}).run(cache, "l4",
                                                                        _probe(root))
    [name] = _files(store)
    raw = (store / name).read_bytes()
    _, n_text, _, _ = struct.unpack("<QQI8s", raw[-28:])
    blocks = json.loads(raw[len(raw) - 28 - n_text : len(raw) - 28])["blocks"]
    assert len(blocks) > 4 and max(b[3] for b in blocks) <= 200
    again = Dissection(mask_store=store, **KW).run(cache, "l4", _no_decoding(_probe(root)))
    assert again.config["segmentations"]["source"] == "read from the store"
    for r in (first, again):
        _same(r, plain)


def test_a_store_read_failing_in_the_tally_leaves_torch_threads_as_they_were(world, tmp_path,
                                                                            monkeypatch):
    """The thread reading the store ahead starts before the run sets its torch threads, so
    whenever it ends it restores the process's default, not the run's: threads started
    after a failed run get the count the program set."""
    import threading

    import torch

    import interptool.analyzers.dissection._analyzer as an
    from interptool.analyzers.dissection._tally import TallyAccumulator

    root, cache = world
    store = tmp_path / "store"
    Dissection(mask_store=store, **KW).run(cache, "l4", _probe(root))
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        # the run's own count (2 cores idle: 2), not the program's 3
        monkeypatch.setattr(an, "analysis_threads", lambda workers=0: {"torch_threads": 2})
        real, calls = TallyAccumulator.add, []

        def add(self, *args):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real(self, *args)

        monkeypatch.setattr(TallyAccumulator, "add", add)
        with pytest.raises(KeyboardInterrupt):  # batches of 1: the reader is still reading
            Dissection(mask_store=store, **{**KW, "batch_size": 1}).run(cache, "l4",
                                                                        _probe(root))
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [3] and torch.get_num_threads() == 3
        assert [th.name for th in threading.enumerate() if "mask-store" in th.name] == []
    finally:
        torch.set_num_threads(before)


def test_a_probe_beyond_the_store_limits_is_decoded_and_said(world, tmp_path, capsys,
                                                             monkeypatch):
    import interptool.analyzers.dissection._mask_store as ms

    root, cache = world
    monkeypatch.setattr(ms, "_MAX_PLANES", 1)  # the world's images have two (color, object)
    r = Dissection(mask_store=tmp_path / "store", **KW).run(cache, "l4", _probe(root))
    assert r.config["segmentations"]["source"] == \
        "decoded; not stored: probe image 0 has more than 1 mask planes"
    assert "mask store: not stored: probe image 0 has more than 1 mask planes; the masks " \
        "are decoded on every run" in capsys.readouterr().err
    assert _files(tmp_path / "store") == []


def test_two_writers_at_once_leave_one_whole_file(world, tmp_path):
    root, cache = world
    store = tmp_path / "store"
    procs = _children(tmp_path, root, cache, store, 2)
    assert len([f for f in _files(store) if ".partial-" in f]) == 2  # both writing
    (tmp_path / "gate").touch()
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.strip() == "decoded and stored"
    [name] = _files(store)
    r = Dissection(mask_store=store, **KW).run(cache, "l4", _no_decoding(_probe(root)))
    assert r.config["segmentations"]["source"] == "read from the store"
    _same(r, Dissection(**KW).run(cache, "l4", _probe(root)))


def test_a_full_disk_ends_the_storing_not_the_run(world, tmp_path, capsys):
    """A real full disk on a small tmpfs (CI runs as root), filled by another writer while
    the store is being written; where mounting is refused, the same failure injected."""
    root, cache = world
    ref = Dissection(**KW).run(cache, "l4", _probe(root))
    fs = SmallFS(tmp_path / "small", "1m")
    try:
        store = fs.root / "store"
        probe = _probe(root)
        if fs.mounted:
            real_load = probe.load_segmentation

            def fill_then_load(i):
                if i == 6 and not (fs.root / "filler").exists():  # the first block is written
                    with open(fs.root / "filler", "wb", buffering=0) as fh:
                        try:
                            while True:
                                fh.write(b"\0" * 4096)
                        except OSError:  # full now
                            pass
                return real_load(i)

            probe.load_segmentation = fill_then_load
            r = Dissection(mask_store=store, **KW).run(cache, "l4", probe)
        else:
            import interptool.analyzers.dissection._mask_store as ms

            real = ms.StoreWriter.add

            def add(self, items):
                if items[0].index >= 4:
                    raise OSError(28, "No space left on device")
                return real(self, items)
            ms.StoreWriter.add = add
            try:
                r = Dissection(mask_store=store, **KW).run(cache, "l4", probe)
            finally:
                ms.StoreWriter.add = real
        why = r.config["segmentations"]["source"]
        assert why.startswith("decoded; not stored: no space left on "), why
        err = capsys.readouterr().err
        assert "mask store: not stored: no space left" in err and "the run goes on" in err
        assert _files(store) == []  # no partial, no file that looks whole
        _same(r, ref)
    finally:
        fs.close()


def test_no_room_for_the_tables_is_said_before_decoding(world, tmp_path, capsys,
                                                        monkeypatch):
    import interptool._provenance as prov

    root, cache = world
    monkeypatch.setattr(prov, "free_bytes", lambda path: 100)
    r = Dissection(mask_store=tmp_path / "store", **KW).run(cache, "l4", _probe(root))
    assert "GiB free on" in r.config["segmentations"]["source"]
    assert "not used (needs at least" in capsys.readouterr().err
    assert _files(tmp_path / "store") == []


def test_cli_mask_store_reused_across_processes_and_recorded(world, tmp_path, capsys):
    root, cache = world
    store = tmp_path / "store"
    args = ["dissect", str(cache), "--layer", "l4", "--quantile", "0.2", "--no-figures",
            "--quiet", "--mask-store", str(store), "--workers", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    docs = [json.loads((tmp_path / d / "l4" / "summary.json").read_text()) for d in "ab"]
    assert [d["config"]["segmentations"]["source"] for d in docs] == [
        "decoded and stored", "read from the store"]
    assert docs[1]["config"]["mask_store"] == str(store)
    assert (tmp_path / "a" / "l4" / "tally.csv").read_bytes() == \
        (tmp_path / "b" / "l4" / "tally.csv").read_bytes()
    # a file, not a folder: one line naming the option, exit 2, before any work
    (tmp_path / "file").write_text("x")
    rc = main([*args[:-4], "--mask-store", str(tmp_path / "file"), "--out",
               str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "mask_store" in err \
        and "expected a folder" in err
    rc = main([*args[:-4], "--mask-store", "", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "expected the name of a folder" in err
    assert not (tmp_path / "c" / "l4").exists()
    # a folder that cannot be made (below a file): the run goes on decoding, and says so
    rc = main([*args[:-4], "--mask-store", str(tmp_path / "file" / "store"), "--out",
               str(tmp_path / "d")])
    assert rc == 0 and "not used (cannot write to" in capsys.readouterr().err
    doc = json.loads((tmp_path / "d" / "l4" / "summary.json").read_text())
    assert doc["config"]["segmentations"]["source"].startswith("decoded; store not used")
