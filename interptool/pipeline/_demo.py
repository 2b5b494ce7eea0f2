"""``interptool demo``: ``run_compare`` on the built-in default, no download needed.

The default is the paper's comparison in miniature: concept-world eval and probe splits
(generated, Broden format) and four small models shipped in ``interptool/weights/`` and
trained by ``examples/concept_world_kd/train.py``: a teacher (``interptool:cw-teacher``) and
three ``interptool:cw-student`` students trained from scratch, with label smoothing (0.1) and by
logit KD from the teacher (alpha 0.5, T 4). See ``interptool/weights/manifest.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from interptool.errors import InterptoolError
from interptool.pipeline._config import (
    AnalysisConfig,
    AttributionConfig,
    CompareConfig,
    DataConfig,
    DissectionConfig,
    ModelConfig,
    RunConfig,
    SimilarityConfig,
    analysis_toml,
)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
# Sizes chosen so that `make demo` finishes in about 3 minutes on two CPU cores.
DEMO_N = 500
DEMO_SIZE = 64
DEMO_SEED = 0
# KD first: findings compare students pairwise in this order, so "kd vs scratch" leads
STUDENTS = ("kd", "scratch", "ls")


def demo_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The shipped weights' manifest (recipe, sha256, accuracies)."""
    path = weights_dir / "manifest.json"
    if not path.is_file():
        raise InterptoolError(
            f"{path}: the demo weights are missing from this installation; re-install "
            "interptool or recreate them with `python examples/concept_world_kd/train.py`"
        )
    return json.loads(path.read_text())


def demo_config(n: int | None = None, device: str = "cpu",
                weights_dir: Path = WEIGHTS_DIR) -> CompareConfig:
    """The built-in default as a :class:`CompareConfig` (every file checked first)."""
    from interptool._provenance import sha256_file

    manifest = demo_manifest(weights_dir)
    n = DEMO_N if n is None else int(n)
    if n < 20:
        raise InterptoolError(f"demo --n must be >= 20 (images per split), got {n}")

    def spec(split: str) -> str:
        return f"builtin:concept-world?n={n}&size={DEMO_SIZE}&seed={DEMO_SEED}&split={split}"

    models = {}
    for name in ("teacher", *STUDENTS):
        entry = manifest["models"].get(name)
        path = weights_dir / f"{name}.safetensors"
        if entry is None or not path.is_file():
            raise InterptoolError(f"{path}: demo weights for {name!r} are missing; re-install "
                                  "interptool or re-run examples/concept_world_kd/train.py")
        if sha256_file(path) != entry["sha256"]:
            raise InterptoolError(f"{path}: sha256 differs from manifest.json; the file was "
                                  "modified or truncated; re-install interptool")
        models[name] = ModelConfig(
            name=name, arch=entry["arch"], checkpoint=str(path), layers=["layer3", "layer4"],
            role="teacher" if name == "teacher" else "student",
        )
    return CompareConfig(
        data=DataConfig(eval=spec("eval"), probe=spec("probe")),
        models=models,
        analysis=AnalysisConfig(
            dissection=DissectionConfig(top_units=4),
            similarity=SimilarityConfig(temperatures=[1.0, 4.0], n_boot=500),
            attribution=AttributionConfig(methods=["grad_cam", "integrated_gradients"],
                                          n_images=16, n_steps=16),
        ),
        run=RunConfig(device=device, batch_size=100, seed=DEMO_SEED, workers=0),
        source="<built-in demo>",
    )


def demo_config_text(cfg: CompareConfig) -> str:
    """The demo config written out as the TOML a user would write for it."""
    lines = ["# interptool demo: the built-in default", "[data]",
             f'eval = "{cfg.data.eval}"', f'probe = "{cfg.data.probe}"']
    for m in cfg.models.values():
        lines += ["", f"[models.{m.name}]", f'arch = "{m.arch}"',
                  f'checkpoint = "{Path(m.checkpoint).name}"  # interptool/weights/',
                  f"layers = {json.dumps(m.layers)}", f'role = "{m.role}"']
    lines += ["", *analysis_toml(cfg.analysis),
              "", "[run]", f'device = "{cfg.run.device}"', f"batch_size = {cfg.run.batch_size}",
              f"seed = {cfg.run.seed}"]
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "demo_out", *, device: str = "cpu", n: int | None = None,
             command: str | None = None) -> Path:
    """Run the built-in comparison and return the path of ``report.html``."""
    from interptool.pipeline._runner import run_compare

    cfg = demo_config(n=n, device=device)
    manifest = demo_manifest()
    recipe = manifest.get("recipe", {})
    title = (f"interptool demo: KD vs scratch vs label smoothing on concept-world "
             f"(KD alpha {recipe.get('kd_alpha')}, T {recipe.get('kd_temperature')})")
    return run_compare(cfg, out, config_text=demo_config_text(cfg),
                       command=command or "interptool demo", title=title)
