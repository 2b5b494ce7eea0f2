"""Output folders of ``dissect``, ``attribute`` and ``compare`` are locked for the whole run
(issue 11 item 1): a second process writing the same ``--out`` gets exit 2 and one line naming
the holder, before it opens, resumes or replaces anything there, ``--overwrite`` included.

The first writer is a real second process holding interptool's lock through the public helper
(``interptool._provenance.output_lock``) on the folder, exactly as a running command does.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from interptool._locks import lock_path, read_lock_holder
from interptool.cli import main

DATA = "builtin:concept-world?version=1&n=8&size=32&seed=0"
_HOLDER = """
import sys, time
from interptool._provenance import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _compare_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f"""
[data]
eval = "{DATA}&split=eval"
probe = "{DATA}&split=probe"
[models.teacher]
arch = "interptool:cw-teacher"
layers = ["layer4"]
image_size = 32
role = "teacher"
[models.student]
arch = "interptool:cw-student"
layers = ["layer4"]
image_size = 32
[analysis]
dissection = false
similarity = {{ temperatures = [1], n_boot = 20 }}
attribution = false
""")
    return path


# each command with --overwrite, and a file that an earlier run of it would have left in OUT
COMMANDS = {
    "dissect": (lambda tmp: ["dissect", "--arch", "interptool:cw-student", "--image-size", "32",
                             "--probe", DATA, "--layer", "layer4", "--overwrite"],
                "activations.h5"),
    "attribute": (lambda tmp: ["attribute", "--arch", "interptool:cw-student", "--image-size",
                               "32", "--data", DATA, "--method", "grad_cam", "--layer",
                               "layer4", "--n", "2", "--overwrite"],
                  "attributions.h5"),
    "compare": (lambda tmp: ["compare", str(_compare_config(tmp)), "--overwrite"],
                "cache/teacher_eval.h5"),
    # the lock comes before the caches are opened: they need not exist (without the lock the
    # error would be a missing cache, not the holder's line)
    "similarity": (lambda tmp: ["similarity", str(tmp / "teacher.h5"), str(tmp / "student.h5")],
                   "similarity.json"),
    "cka": (lambda tmp: ["cka", str(tmp / "teacher.h5"), str(tmp / "student.h5"),
                         "--layer", "layer4"],
            "cka.json"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_second_writer_stops_with_exit_2_and_touches_nothing(tmp_path, capsys, command):
    argv, left_by_first = COMMANDS[command]
    out = tmp_path / "out"
    kept = out / left_by_first
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"the first run's work")
    first = _holder(out)
    try:
        rc = main([*argv(tmp_path), "--out", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
    finally:
        _stop(first)
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.fullmatch(
        rf"interptool {command}: error: another interptool process \(pid {first.pid} on \S+, "
        rf"started at [0-9T:+-]+\) is writing {re.escape(str(out.resolve()))}; wait for it or "
        r"choose another --out", err), err
    assert "--overwrite" not in err.split("error:", 1)[1]
    # --overwrite removed nothing the holder owns, and nothing else was written
    assert kept.read_bytes() == b"the first run's work"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == sorted(
        {Path(left_by_first).as_posix(), *(p.as_posix() for p in Path(left_by_first).parents
                                            if p != Path("."))})


def test_attribute_holds_the_lock_while_it_writes_and_releases_it(tmp_path, monkeypatch):
    import interptool.analyzers.attribution as attribution_pkg

    out = tmp_path / "att"
    seen: list[dict | None] = []
    real = attribution_pkg.Attribution

    class Spy(real):
        def run(self, *args, **kw):
            seen.append(read_lock_holder(out.resolve()))
            return super().run(*args, **kw)

    monkeypatch.setattr(attribution_pkg, "Attribution", Spy)
    assert main(["attribute", "--arch", "interptool:cw-student", "--image-size", "32", "--data",
                 DATA, "--method", "saliency", "--n", "2", "--sanity-n", "0",
                 "--faithfulness-steps", "0", "--out", str(out), "--quiet"]) == 0
    assert seen and all(h is not None and h["pid"] == os.getpid() for h in seen)
    assert (out / "scores.json").exists()
    assert not lock_path(out.resolve()).exists()  # released (and removed) at the end


def test_compare_holds_the_lock_around_the_whole_run(tmp_path, monkeypatch):
    from interptool.pipeline import _runner, load_config

    out = tmp_path / "cmp"
    seen = []

    def fake_execute(run, *args):
        seen.append((read_lock_holder(out.resolve()), run.out))
        return run.out / "report.html"

    monkeypatch.setattr(_runner, "_execute", fake_execute)
    _runner.run_compare(load_config(_compare_config(tmp_path)), out)
    holder, run_out = seen[0]
    assert holder is not None and holder["pid"] == os.getpid() and run_out == out
    assert not lock_path(out.resolve()).exists()


def test_dissect_after_the_holder_ends_runs(tmp_path, capsys):
    """The kernel drops a killed holder's lock: the next run proceeds (its stale .lock file
    is taken over), so a crash never blocks the folder."""
    out = tmp_path / "dis"
    first = _holder(out)
    _stop(first)
    assert lock_path(out).exists()  # the killed holder could not clean up
    assert main(["dissect", "--arch", "interptool:cw-student", "--image-size", "32", "--probe",
                 DATA, "--layer", "layer4", "--out", str(out), "--no-figures", "--quiet"]) == 0
    assert (out / "layer4" / "summary.json").exists()
    assert not lock_path(out).exists()


def test_attribution_store_is_locked_on_its_own(tmp_path, capsys):
    """The HDF5 store holds its own lock too, so a writer that reaches the same
    ``attributions.h5`` through another --out (or through the Python API) is stopped."""
    import torch

    from interptool._locks import OutputLockedError
    from interptool.analyzers.attribution import Attribution
    from interptool.loading._zoo import ZOO

    out = tmp_path / "att"
    store = out / "attributions.h5"
    first = _holder(store)
    try:
        rc = main(["attribute", "--arch", "interptool:cw-student", "--image-size", "32",
                   "--data", DATA, "--method", "saliency", "--n", "2", "--sanity-n", "0",
                   "--faithfulness-steps", "0", "--out", str(out), "--overwrite", "--quiet"])
        err = capsys.readouterr().err.strip()
        net = ZOO["cw-student"](num_classes=10).eval()
        with pytest.raises(OutputLockedError, match=rf"\(pid {first.pid} on .* is writing "
                                                    rf"{re.escape(str(store))}; wait for it"):
            Attribution("saliency").run(net, torch.zeros(2, 3, 32, 32), target=0, out=out,
                                        overwrite=True)
    finally:
        _stop(first)
    assert rc == 2, err
    assert re.fullmatch(
        rf"interptool attribute: error: another interptool process \(pid {first.pid} on \S+, "
        rf"started at [0-9T:+-]+\) is writing {re.escape(str(store))}; wait for it or "
        r"choose another --out", err), err
    assert not store.exists()  # nothing was created behind the holder's back
    # once the holder is gone the same call writes the store and lets go of it
    res = Attribution("saliency").run(ZOO["cw-student"](num_classes=10).eval(),
                                      torch.zeros(2, 3, 32, 32), target=0, out=out)
    assert res.maps.shape == (2, 32, 32) and store.exists()
    assert not lock_path(store).exists()
