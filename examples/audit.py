"""A short audit with single analyzers, without the compare pipeline.

Caches one model's activations on concept-world, dissects ``layer4``, summarises its class
similarity and attributes a few images. Uses the shipped demo teacher:

    python examples/audit.py --out audit_out
"""

from __future__ import annotations

import argparse
from pathlib import Path

from interptool.analyzers.attribution import Attribution
from interptool.analyzers.dissection import Dissection
from interptool.analyzers.similarity import ClassSimilarity
from interptool.cache import ActivationCache, cache_activations
from interptool.data import open_dataset
from interptool.loading import load_model
from interptool.report._demo import WEIGHTS_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="audit_out")
    ap.add_argument("--n", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)

    model = load_model("interptool:cw-teacher", WEIGHTS_DIR / "teacher.safetensors")
    probe = open_dataset(f"builtin:concept-world?n={args.n}&size=64&seed=0&split=probe")
    evals = open_dataset(f"builtin:concept-world?n={args.n}&size=64&seed=0&split=eval")

    # 1. activations -> HDF5 (re-running reuses the files)
    probe_h5 = cache_activations(model, probe, ["layer4"], out / "teacher_probe.h5")
    eval_h5 = cache_activations(model, evals, [], out / "teacher_eval.h5", probe=False)

    # 2. network dissection of layer4
    with ActivationCache(probe_h5) as cache:
        dis = Dissection(quantile=0.005, iou_threshold=0.04).run(cache, "layer4", probe)
    dis.save(out / "dissection")
    print(f"layer4: {len(dis.detectors())} detectors of {dis.units} units, "
          f"{dis.unique_concepts()} unique concepts; by category {dis.by_category()}")

    # 3. class similarity from the logits
    with ActivationCache(eval_h5) as cache:
        sim = ClassSimilarity(temperature=[1, 4]).run(cache)
    sim.save(out / "similarity")
    print(f"accuracy {sim.accuracy:.3f}; within-class entropy (T=1) "
          f"{sim.entropy_overall[1.0]:.3f} nats")

    # 4. Grad-CAM on 8 images
    att = Attribution("grad_cam", layer="layer4").run(model, evals, n=8, out=out / "gradcam")
    att.save(out / "gradcam")
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
