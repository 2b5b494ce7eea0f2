"""The state one ``run_compare`` call shares between its stages."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interptool.pipeline._config import CompareConfig
from interptool.pipeline._stage_cache import StageCache
from interptool.report import FigureSet


class RunContext:
    """Config, output folder, loaded models, data sets, cache paths, figures and timings.

    Filled in stage by stage: :func:`~interptool.pipeline._stages.load_models` sets
    ``loaded``/``eval_ds``/``probe_ds``, :func:`~interptool.pipeline._stages.build_caches`
    sets ``eval_cache``/``probe_cache``; analysis stages read them and add figures.
    """

    def __init__(self, cfg: CompareConfig, out: Path, *, overwrite: bool = False) -> None:
        self.cfg = cfg
        #: the user's --overwrite: caches made with other settings are replaced in place
        self.overwrite = bool(overwrite)
        self.out = Path(out)
        from interptool.cache import use_rank_gpu

        # under torchrun, this rank's GPU: its models load there, not every rank's on GPU 0
        self.device = use_rank_gpu(cfg.run.device)
        self.stages = StageCache(self.out)
        self.figures = FigureSet(self.out)
        self.timings: dict[str, float] = {}
        self.loaded: dict[str, Any] = {}
        self.eval_ds: Any = None
        self.probe_ds: Any = None
        self.eval_cache: dict[str, Path] = {}
        self.probe_cache: dict[str, Path] = {}
        # random-init controls (name -> pipeline._dissect.Baseline) and why a model has none
        self.baselines: dict[str, Any] = {}
        self.baseline_notes: list[str] = []

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, adding its wall time to ``timings[name]`` (seconds, 2 decimals)."""
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 2)

    def dissect_layers(self, model_name: str) -> list[str]:
        """Layers dissected for a model: ``analysis.dissection.layers`` or all its layers."""
        d = self.cfg.analysis.dissection
        m = self.cfg.models[model_name]
        return list(d.layers) if d is not None and d.layers else list(m.layers)

    def class_name(self, label: int) -> str:
        """``"name (label)"`` where the eval set names its classes, else the index."""
        names = getattr(self.eval_ds, "class_names", None)
        if names and 0 <= label < len(names):
            return f"{names[label]} ({label})"
        return str(label)
