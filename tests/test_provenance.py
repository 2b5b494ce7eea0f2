"""Output helpers: atomic writes never leave a torn file under the final name."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from interptool._provenance import (  # noqa: E402
    atomic_savefig,
    atomic_write_text,
    sha256_bytes,
    sha256_file,
)


def test_atomic_savefig_writes_png_and_leaves_nothing_on_failure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = tmp_path / "sub" / "f.png"
    atomic_savefig(fig, out, dpi=50)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["f.png"]

    class Exploding:
        def savefig(self, path, **kw):
            with open(path, "wb") as f:
                f.write(b"half")
            raise KeyboardInterrupt

    target = tmp_path / "g.png"
    with pytest.raises(KeyboardInterrupt):
        atomic_savefig(Exploding(), target)
    assert not target.exists()  # only the temporary name may hold the torn bytes
    plt.close(fig)


def test_atomic_write_text_replaces_whole_file_and_hashes_match(tmp_path):
    p = tmp_path / "a.csv"
    atomic_write_text(p, "x,y\n1,2\n")
    atomic_write_text(p, "x\n3\n")
    assert p.read_text() == "x\n3\n"
    assert sha256_file(p) == sha256_bytes(b"x\n3\n")


def test_temporary_names_of_text_and_figures_do_not_pass_for_outputs(tmp_path, monkeypatch):
    """A SIGKILL mid-write leaves the temporary file behind; for text and figures its name
    ends in ".tmpPID", not in ".png"/".json", so it never passes for an output (a glob of
    "*.png" does not find it). numpy-style writers keep the suffix last (savez needs it)."""
    import os as _os

    from interptool import _provenance

    seen = []
    real = _os.replace

    def spy(src, dst):
        seen.append((Path(src).name, Path(dst).name))
        real(src, dst)

    monkeypatch.setattr(_provenance.os, "replace", spy)
    _provenance.atomic_write_text(tmp_path / "a.json", "{}")
    fig = plt.figure()
    _provenance.atomic_savefig(fig, tmp_path / "b.png")
    plt.close(fig)
    with _provenance.atomic_path(tmp_path / "c.npz") as tmp:
        np.savez(tmp, x=np.zeros(2))
    pid = _os.getpid()
    assert seen == [(f"a.json.tmp{pid}", "a.json"), (f"b.png.tmp{pid}", "b.png"),
                    (f"c.tmp{pid}.npz", "c.npz")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png", "c.npz"]


# ---------------------------------------------------------------------------- checksums
def _count_reads(monkeypatch):
    from interptool import _provenance

    reads = []
    real = _provenance._hash_file

    def spy(path, *a, **k):
        reads.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(_provenance, "_hash_file", spy)
    return reads


def test_sha256_file_reads_a_file_again_only_when_it_changed(tmp_path, monkeypatch):
    import hashlib
    import os as _os

    reads = _count_reads(monkeypatch)
    p = tmp_path / "cache.h5"
    data = np.random.default_rng(0).bytes(3 * 2**20 + 5)  # several chunks
    p.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(p) == want and sha256_file(p) == want
    assert reads == ["cache.h5"]  # the second call did not read it
    # changed in place, same size, and its modification time set back (`touch -r`, `cp -p`):
    # the change time moved, so it is read again
    st = _os.stat(p)
    changed = b"X" + data[1:]
    p.write_bytes(changed)
    _os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _os.stat(p).st_mtime_ns == st.st_mtime_ns
    assert sha256_file(p) == hashlib.sha256(changed).hexdigest()
    # replaced by renaming a new file over it (how interptool writes): a new inode
    atomic_write_text(p, "x\n")
    assert sha256_file(p) == sha256_bytes(b"x\n")
    assert reads == ["cache.h5"] * 3


def test_background_digest_result_errors_and_cancel(tmp_path, monkeypatch):
    import hashlib
    import threading

    from interptool import _provenance
    from interptool._provenance import BackgroundDigest

    reads = _count_reads(monkeypatch)
    p = tmp_path / "a.bin"
    data = np.random.default_rng(1).bytes(2**21 + 3)
    p.write_bytes(data)
    assert BackgroundDigest(p).result() == hashlib.sha256(data).hexdigest()
    assert BackgroundDigest(p).result() == sha256_file(p)  # remembered: no thread, no read
    assert reads == ["a.bin"]
    with pytest.raises(FileNotFoundError):
        BackgroundDigest(tmp_path / "missing.h5").result()
    # a file deleted once it was read: the digest stands (it is only not remembered)
    gone = tmp_path / "gone.bin"
    gone.write_bytes(b"bytes")
    real = _provenance._hash_file

    def read_then_delete(path, *a, **k):
        out = real(path, *a, **k)
        Path(path).unlink()
        return out

    monkeypatch.setattr(_provenance, "_hash_file", read_then_delete)
    assert BackgroundDigest(gone).result() == sha256_bytes(b"bytes")
    monkeypatch.setattr(_provenance, "_hash_file", real)
    # the real reader stops between chunks once asked to
    stop = threading.Event()
    stop.set()
    assert _provenance._hash_file(p, stop=stop) is None

    # cancel() reaches the thread's reader, and result() then says it was cancelled
    started = threading.Event()

    def slow(path, chunk=1 << 20, stop=None):
        started.set()
        assert stop is not None and stop.wait(30)
        return None

    monkeypatch.setattr(_provenance, "_hash_file", slow)
    q = tmp_path / "b.bin"
    q.write_bytes(b"other")
    digest = BackgroundDigest(q)
    assert started.wait(30)
    digest.cancel()
    with pytest.raises(RuntimeError, match="cancelled"):
        digest.result()
    monkeypatch.undo()  # the real reader again
    assert sha256_file(q) == sha256_bytes(b"other")  # nothing remembered from the cancel
