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
