"""Best achievable dissection IoU per concept of a probe set, measured with interptool's own
``Dissection`` on "oracle" units (the table in docs/data.md).

For every label ``l`` of the probe, unit ``l`` of a hand-built activation cache is the label's
mask at segmentation size (image-level labels: the whole image when the label is present):

* ``copy`` mode: the unit is the mask itself (0/1). Dissected with ``quantile=0.99`` its
  threshold falls on 0, so the unit's mask is exactly the label's and the IoU is 1: this checks
  that every concept is present, aligned and reachable through the whole path (PNG masks ->
  reader -> tally).
* ``ceiling`` mode: the unit is the mask times ``1 + u`` with a random tie-break ``u`` (per
  position; per image for image-level labels), dissected with the standard ``quantile=0.005``.
  Its top 0.5 % of positions then all lie inside the label, which is the best any unit can
  do: a unit's mask covers only ~0.5 % of all positions, so a label covering a fraction
  ``c`` of them scores at most about ``0.005 / c`` (and 1 when ``c <= 0.005``).

    python examples/kd_reproduction/concept_ceiling.py --version 2 --n 500 --size 48
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def oracle_features(probe: Any, mode: str, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """(N, L, sh, sw) float32 oracle activations, one unit per label number 1..L-1."""
    rng = np.random.default_rng(seed)
    labels = [int(j) for j in range(1, probe.num_labels) if probe.label_category[j] >= 0]
    n = len(probe)
    sh, sw = probe.seg_size(0)
    feats = np.zeros((n, len(labels), sh, sw), np.float32)
    col = {j: k for k, j in enumerate(labels)}
    for i in range(n):
        seg = probe.load_segmentation(i)
        for planes in seg.pixel.values():
            for plane in planes:
                for j in np.unique(plane):
                    if j > 0:
                        feats[i, col[int(j)]] = np.maximum(feats[i, col[int(j)]], plane == j)
        for nums in seg.image.values():
            for j in nums:
                feats[i, col[int(j)]] = 1.0
    if mode == "ceiling":
        pixel_level = np.array([probe.categories[probe.label_category[j]] in
                                probe.pixel_categories for j in labels])
        tie = rng.random(feats.shape, dtype=np.float32)
        per_image = rng.random((n, len(labels), 1, 1), dtype=np.float32)
        tie[:, ~pixel_level] = np.broadcast_to(per_image[:, ~pixel_level], tie[:, ~pixel_level].shape)
        feats = feats * (1.0 + tie)
    return feats, labels


def oracle_table(probe: Any, mode: str = "ceiling", workdir: Path | None = None) -> pd.DataFrame:
    """One row per label: category, name, coverage, IoU of the oracle unit (via Dissection)."""
    from interptool.analyzers import Dissection
    from interptool.cache import write_cache

    feats, labels = oracle_features(probe, mode)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = write_cache(Path(tmp) / "oracle.h5", logits=np.zeros((len(probe), 1)),
                           ids=probe.ids, features={"oracle": feats},
                           attrs={"data_fingerprint": probe.fingerprint, "data_spec": probe.spec})
        q = 0.99 if mode == "copy" else 0.005
        res = Dissection(quantile=q, categories=list(probe.categories)).run(path, "oracle", probe)
    rows = []
    total = feats.shape[0] * feats.shape[2] * feats.shape[3]
    for u, j in enumerate(labels):
        c = int(res.label_category[j])  # index into the result's category order
        inter = float(res.intersect[u, j])
        iou = inter / (float(res.unit_cat_area[u, c]) + float(res.label_area[j]) - inter + 1e-10)
        rows.append({"category": res.categories[c], "label": str(probe.label_names[j]),
                     "coverage": float(res.label_area[j]) / total, "iou": iou})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", type=int, default=2)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--size", type=int, default=48)
    args = ap.parse_args()
    from interptool.data import open_dataset

    probe = open_dataset(f"builtin:concept-world?version={args.version}&n={args.n}"
                         f"&size={args.size}&seed=0&split=probe")
    copy = oracle_table(probe, "copy")
    ceil = oracle_table(probe, "ceiling")
    ceil["copy_iou"] = copy["iou"]
    pd.set_option("display.width", 160)
    print(ceil.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    g = ceil.groupby("category", sort=False)
    summary = pd.DataFrame({
        "labels": g.size(),
        "reach_0.04": g["iou"].apply(lambda s: int((s >= 0.04).sum())),
        "best_iou": g["iou"].max(),
        "best_label": g.apply(lambda d: d.loc[d["iou"].idxmax(), "label"]),
        "median_iou": g["iou"].median(),
        "min_copy_iou": g["copy_iou"].min(),
    })
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
