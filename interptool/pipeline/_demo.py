"""``interptool demo``: ``run_compare`` on the built-in default, no download needed.

The default is the paper's comparison in miniature: concept-world version 2 eval and probe
splits (generated, Broden format, 48 px) and four models shipped in ``interptool/weights/``
from the reproduction study (``examples/kd_reproduction/``, ``docs/reproduction.md``): a
ResNet-34-style teacher (``interptool:cw2-resnet34``) and three ResNet-18-style students
(``interptool:cw2-resnet18``, seed 0 of each recipe) trained from scratch, with label
smoothing (0.1) and by logit KD from the teacher (alpha 0.5, T 4). See
``interptool/weights/reproduction.json`` (its ``shipped`` table).
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
MANIFEST = "reproduction.json"
# Sizes chosen to keep `make demo` short on two CPU cores (70 s measured on a quiet 2-core
# machine before the dissection bootstrap's statistics came from the tally's own pass and
# faithfulness shared its random-order reference across methods: 240 -> 182 CPU-s on a
# loaded machine, same numbers); the study's resolution and concept-world version. No
# setting was reduced for time: 1,000 dissection resamples, 12 attribution images.
DEMO_N = 200
DEMO_SIZE = 48
DEMO_VERSION = 2
DEMO_SEED = 0
# KD first: findings compare students pairwise in this order, so "kd vs scratch" leads
STUDENTS = ("kd", "scratch", "ls")


def demo_manifest(weights_dir: Path = WEIGHTS_DIR) -> dict[str, Any]:
    """The shipped weights' manifest: ``models`` (file, arch, sha256, eval_accuracy per model),
    ``recipe`` (with ``kd_temperature`` of the shipped KD student) and ``data``, read from the
    reproduction study's ``reproduction.json``."""
    path = weights_dir / MANIFEST
    if not path.is_file():
        raise InterptoolError(
            f"{path}: the demo weights are missing from this installation; re-install "
            "interptool or recreate them with `python examples/kd_reproduction/train.py` and "
            "`python examples/kd_reproduction/ship.py`"
        )
    study = json.loads(path.read_text())
    shipped = study.get("shipped", {})
    kd_run = study.get("runs", {}).get(shipped.get("kd", {}).get("run", ""), {})
    recipe = {**study.get("recipe", {}), "kd_temperature": kd_run.get("T"),
              "label_smoothing_epsilon": study.get("recipe", {}).get("label_smoothing")}
    return {"models": shipped, "recipe": recipe, "data": study.get("data", {})}


def demo_config(n: int | None = None, device: str = "cpu",
                weights_dir: Path = WEIGHTS_DIR) -> CompareConfig:
    """The built-in default as a :class:`CompareConfig` (every file checked first)."""
    from interptool._provenance import sha256_file

    manifest = demo_manifest(weights_dir)
    n = DEMO_N if n is None else int(n)
    if n < 20:
        raise InterptoolError(f"demo --n must be >= 20 (images per split), got {n}")

    def spec(split: str) -> str:
        return (f"builtin:concept-world?version={DEMO_VERSION}&n={n}&size={DEMO_SIZE}"
                f"&seed={DEMO_SEED}&split={split}")

    models = {}
    for name in ("teacher", *STUDENTS):
        entry = manifest["models"].get(name)
        path = weights_dir / (entry["file"] if entry else f"cw2-{name}.safetensors")
        if entry is None or not path.is_file():
            raise InterptoolError(f"{path}: demo weights for {name!r} are missing; re-install "
                                  "interptool or re-run examples/kd_reproduction/ship.py")
        if sha256_file(path) != entry["sha256"]:
            raise InterptoolError(f"{path}: sha256 differs from {MANIFEST}; the file was "
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
                                          n_images=12, n_steps=8),
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
    if cfg.run.workers is not None:  # unset in the file means "chosen from the cores"
        lines.append(f"workers = {cfg.run.workers}")
    return "\n".join(lines) + "\n"


def run_demo(out: str | Path = "demo_out", *, device: str = "cpu", n: int | None = None,
             command: str | None = None) -> Path:
    """Run the built-in comparison and return the path of ``report.html``."""
    from interptool.pipeline._runner import run_compare

    cfg = demo_config(n=n, device=device)
    manifest = demo_manifest()
    recipe = manifest.get("recipe", {})
    title = (f"interptool demo: KD vs scratch vs label smoothing on concept-world v2 "
             f"(KD alpha {recipe.get('kd_alpha')}, T {recipe.get('kd_temperature')})")
    return run_compare(cfg, out, config_text=demo_config_text(cfg),
                       command=command or "interptool demo", title=title)
