"""Copy one model per recipe of the study into ``interptool/weights/`` for the demo.

Seed 0 of every recipe is shipped (chosen before any result was seen, not the best seed):
``cw2-teacher``, ``cw2-scratch``, ``cw2-ls``, ``cw2-kd`` (``.safetensors``, float16), and
``interptool/weights/reproduction.json``: the study's manifest (recipe, data, every run with its
sha256, accuracy and CPU seconds) plus ``shipped``: per shipped model its file, arch, sha256,
the run it came from, and ``check_accuracy`` on the first ``CHECK_N`` eval images computed
through the public path (``load_model`` + ``eval_transform``) that tests/test_reproduction.py
repeats.

    python examples/kd_reproduction/ship.py --runs examples/kd_reproduction/runs
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE.parents[1] / "interptool" / "weights"
SHIP = {"teacher": "teacher", "scratch": "scratch-s0", "ls": "ls-s0", "kd": "kd-T4-s0"}
CHECK_N = 200


def check_accuracy(arch: str, path: Path, eval_spec: str, n: int = CHECK_N) -> float:
    """Top-1 accuracy on the first ``n`` eval images through load_model + eval_transform."""
    import torch

    from interptool.data import open_dataset
    from interptool.loading import load_model

    ds = open_dataset(eval_spec.replace("n=1000", f"n={n}"))
    lm = load_model(arch, path)
    tf = lm.preprocessing.eval_transform()
    with torch.no_grad():
        x = torch.stack([tf(ds.load_image(i)) for i in range(len(ds))])
        pred = lm.model(x).argmax(1).numpy()
    return float((pred == ds.labels).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=HERE / "runs")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(HERE))
    from train import collect

    from interptool._provenance import sha256_file

    manifest: dict[str, Any] = collect(args.runs)
    shipped = {}
    for role, run in SHIP.items():
        entry = manifest["runs"][run]
        dst = args.weights / f"cw2-{role}.safetensors"
        shutil.copyfile(args.runs / entry["file"], dst)
        sha = sha256_file(dst)
        if sha != entry["sha256"]:
            raise SystemExit(f"{dst}: sha256 differs from {run}.json")
        shipped[role] = {
            "file": dst.name, "arch": entry["arch"], "run": run, "sha256": sha,
            "eval_accuracy": entry["eval_accuracy"],
            "check_n": CHECK_N,
            "check_accuracy": check_accuracy(entry["arch"], dst, entry["eval_spec"]),
        }
        print(f"{role}: {run} -> {dst.name} (eval {entry['eval_accuracy']:.4f}, first "
              f"{CHECK_N}: {shipped[role]['check_accuracy']:.4f})")
    manifest["shipped"] = shipped
    out = args.weights / "reproduction.json"
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum((args.weights / s["file"]).stat().st_size for s in shipped.values())
    print(f"{out}: {len(manifest['runs'])} runs; shipped {total / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
