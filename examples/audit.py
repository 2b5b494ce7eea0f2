"""A short audit with single analyzers, without the compare pipeline.

Caches one model's activations on concept-world, dissects ``layer4``, summarises its class
similarity and attributes a few images. Uses the shipped demo teacher:

    python examples/audit.py --out audit_out

or your own model and data (the eval images must use the model's classes):

    python examples/audit.py --arch timm:resnet18 --checkpoint resnet18_kd.pth --image-size 64 \
        --eval imagefolder:val --probe 'builtin:concept-world?n=200&size=64&split=probe' --out audit_kd
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
from interptool.pipeline._demo import WEIGHTS_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="audit_out")
    ap.add_argument("--n", type=int, default=200, help="concept-world images per split")
    ap.add_argument("--arch", default="interptool:cw2-resnet34")
    ap.add_argument("--checkpoint", default=None,
                    help="weight file (default: the shipped demo teacher with its default arch)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--eval", default=None, help="labelled data spec (default: concept-world eval)")
    ap.add_argument("--probe", default=None, help="Broden data spec (default: concept-world probe)")
    args = ap.parse_args()
    out = Path(args.out)
    layer = args.layer

    checkpoint = args.checkpoint
    if checkpoint is None and args.arch == "interptool:cw2-resnet34":
        checkpoint = WEIGHTS_DIR / "cw2-teacher.safetensors"
    model = load_model(args.arch, checkpoint, image_size=args.image_size)
    probe = open_dataset(args.probe or f"builtin:concept-world?n={args.n}&size=48&seed=0&split=probe&version=2")
    evals = open_dataset(args.eval or f"builtin:concept-world?n={args.n}&size=48&seed=0&split=eval&version=2")

    # 1. activations -> HDF5 (re-running with the same model and data reuses the files)
    probe_h5 = cache_activations(model, probe, [layer], out / "probe.h5")
    eval_h5 = cache_activations(model, evals, [], out / "eval.h5", probe=False)

    # 2. network dissection of the layer
    with ActivationCache(probe_h5) as cache:
        dis = Dissection(quantile=0.005, iou_threshold=0.04).run(cache, layer, probe)
    dis.save(out / "dissection")
    print(f"{layer}: {len(dis.detectors())} detectors of {dis.units} units, "
          f"{dis.unique_concepts()} unique concepts; by category {dis.by_category()}")

    # 3. class similarity from the logits
    with ActivationCache(eval_h5) as cache:
        sim = ClassSimilarity(temperature=[1, 4]).run(cache)
    sim.save(out / "similarity")
    print(f"accuracy {sim.accuracy:.3f}; within-class entropy (T=1) "
          f"{sim.entropy_overall[1.0]:.3f} nats")

    # 4. Grad-CAM on 8 images
    att = Attribution("grad_cam", layer=layer).run(model, evals, n=8, out=out / "gradcam")
    att.save(out / "gradcam")
    print(f"wrote {out}/")


if __name__ == "__main__":
    main()
