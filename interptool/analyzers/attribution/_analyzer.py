"""Attribution maps (saliency, integrated gradients, Grad-CAM, ...) and their scores.

Public face::

    res = Attribution("integrated_gradients", steps=32, baseline="blur").run(
        loaded, dataset, n=64, batch_size=16, target="label", device="cpu",
        out="runs/attr")                       # -> AttributionResult (+ runs/attr/attributions.h5)
    agreement(res_teacher, res_student)         # rank correlation / top-k IoU / cosine
    localisation(res, masks)                    # energy pointing game + pointing game
    faithfulness(model, images, res.maps, res.targets, mode="deletion")
    randomisation_check(model, "saliency", images, targets)

Every method is a thin adapter over captum (see ``_attribution_methods.py``); maps keep the
input resolution and are reduced over channels with ``reduce`` (default ``abs_sum``: sum of
absolute values over channels; ``grad_cam`` is one channel already and is only squeezed).
The model is never modified: methods run on a deep copy with in-place activations off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from interptool._progress import progress
from interptool._resources import thread_scope
from interptool.analyzers.attribution._methods import (
    METHODS,
    REDUCTIONS,
    batch_seed,
    get_method,
    hook_count,
    prepare_model,
)
from interptool.analyzers.attribution._scores import (
    AgreementResult,
    FaithfulnessResult,
    LocalisationResult,
    RandomisationResult,
    agreement,
    class_object_masks,
    faithfulness,
    folder_masks,
    iter_blocks,
    localisation,
    randomisation_check,
    resize_masks,
)
from interptool.analyzers.attribution._store import (
    AttributionStore,
    H5Maps,
    TemporaryFolder,
    read_attributions,
)
from interptool.common.numerics import fp32_precision
from interptool.errors import AnalysisError

__all__ = [
    "Attribution",
    "AttributionResult",
    "METHODS",
    "agreement",
    "AgreementResult",
    "localisation",
    "LocalisationResult",
    "class_object_masks",
    "resize_masks",
    "folder_masks",
    "faithfulness",
    "FaithfulnessResult",
    "randomisation_check",
    "RandomisationResult",
    "hook_count",
    "H5Maps",
    "SAMPLES",
    "stratified_sample",
]


# --------------------------------------------------------------------------- inputs
def _is_loaded(obj: Any) -> bool:
    """Duck-typed LoadedModel (avoids importing interptool.loading, built in parallel)."""
    return not isinstance(obj, nn.Module) and hasattr(obj, "model") and hasattr(
        obj, "preprocessing")


def _is_broden(ds: Any) -> bool:
    return hasattr(ds, "load_segmentation")


def _model_info(model_or_loaded: Any, model: nn.Module, weights_hash: bool) -> dict[str, Any]:
    if _is_loaded(model_or_loaded):
        info = model_or_loaded.to_dict()
        return json.loads(json.dumps(info, default=str))
    n_params = sum(int(t.numel()) for t in model.state_dict().values())
    if not weights_hash:
        return {"class": type(model).__name__, "num_params": n_params}
    # Bare module written to a file: identify it by class and a hash of its weights, so that
    # a resume never mixes maps of two different models.
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        arr = t.detach().cpu().contiguous()
        h.update(arr.numpy().tobytes() if arr.dtype != torch.bfloat16 else
                 arr.float().numpy().tobytes())
    return {"class": type(model).__name__, "num_params": int(n_params),
            "weights_sha256": h.hexdigest()}


class _TensorSource:
    """Uniform row access over a tensor batch or an ImageDataset + transform."""

    def __init__(self, data: Any, *, labels: Any, ids: Sequence[str] | None, transform: Any,
                 n: int | None, sample: str, sample_seed: int = 0) -> None:
        self.dataset = None
        if isinstance(data, torch.Tensor):
            if data.dim() != 4:
                raise AnalysisError(
                    f"input tensor must be (N, C, H, W), got shape {tuple(data.shape)}")
            self.tensor = data
            total = data.shape[0]
            lab = (np.full(total, -1, np.int64) if labels is None
                   else np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1))
            if lab.shape[0] != total:
                raise AnalysisError(f"labels has {lab.shape[0]} entries for {total} images")
            self.labels = lab
            self.ids = [str(i) for i in ids] if ids is not None else [str(i) for i in
                                                                     range(total)]
            if len(self.ids) != total:
                raise AnalysisError(f"ids has {len(self.ids)} entries for {total} images")
            self.spec = "tensor"
            self.fingerprint = hashlib.sha256(
                data.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()
        elif hasattr(data, "torch_dataset") and hasattr(data, "labels"):
            if transform is None:
                raise AnalysisError(
                    "a bare nn.Module with an ImageDataset needs transform=...; pass a "
                    "LoadedModel (its eval/probe transform is used) or a transform callable")
            self.dataset = data
            self.tds = data.torch_dataset(transform)
            self.labels = np.asarray(data.labels, dtype=np.int64)
            self.ids = [str(i) for i in data.ids]
            self.spec = str(getattr(data, "spec", type(data).__name__))
            self.fingerprint = str(getattr(data, "fingerprint", ""))
            total = len(data)
        else:
            raise AnalysisError(
                f"data must be an ImageDataset (interptool.data.open_dataset) or an "
                f"(N, C, H, W) tensor, got {type(data).__name__}")
        if sample not in SAMPLES:
            raise AnalysisError(f"sample must be one of {', '.join(SAMPLES)}; got {sample!r}")
        if n is not None and n < 1:
            raise AnalysisError(f"n must be >= 1, got {n}")
        k = total if n is None else min(total, int(n))
        if sample == "stratified" and k < total:
            self.indices = stratified_sample(self.labels, k, sample_seed)
        else:
            self.indices = np.arange(k, dtype=np.int64)
        self.sample = {"method": sample if k < total else "all", "seed": int(sample_seed),
                       "n": int(k), "of": int(total)}
        self.n = k
        self.labels = self.labels[self.indices]
        self.ids = [self.ids[i] for i in self.indices]
        self._shape: tuple[int, ...] | None = None

    def batch(self, start: int, stop: int) -> torch.Tensor:
        rows = self.indices[start:stop]
        if self.dataset is None:
            return self.tensor[torch.as_tensor(rows)]
        return torch.stack([torch.as_tensor(self.tds[int(i)][0]) for i in rows])


    def input_shape(self) -> tuple[int, int, int]:
        if self._shape is None:
            self._shape = tuple(int(s) for s in self.batch(0, 1).shape[1:])
        return self._shape  # type: ignore[return-value]


#: how ``Attribution.run(n=...)`` picks its images when ``n`` is below the data set's size
SAMPLES = ("first", "stratified")

#: most bytes of maps (plus raw maps with ``keep_raw``) that ``Attribution.run(out=None)``
#: keeps in memory; a larger run streams them to a temporary ``attributions.h5`` and returns
#: lazy :class:`H5Maps` views, as with ``out=`` (ImageNet val at 224 px: ~10 GB of maps)
MAX_IN_MEMORY_MAPS_BYTES = 1 << 30


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """``n`` row indices, sorted, drawn class by class: every class (label; -1 unlabelled
    counts as one more group) gives ``n // classes`` images or all it has, the rest going to
    classes in a seeded random order, so that with ``n`` >= the number of classes every
    class is represented and no class dominates. Rows within a class are a seeded random
    choice; the same ``(labels, n, seed)`` always gives the same rows."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    groups = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    groups = [groups[i] for i in rng.permutation(len(groups))]
    n = int(min(n, labels.size))
    take = np.zeros(len(groups), dtype=np.int64)
    left = n
    while left > 0:  # water-filling: equal shares, capped by class sizes
        open_ = [i for i, g in enumerate(groups) if take[i] < len(g)]
        share = max(1, left // len(open_))
        for i in open_:
            add = min(share, len(groups[i]) - take[i], left)
            take[i] += add
            left -= add
            if left == 0:
                break
    return np.sort(np.concatenate([g[:t] for g, t in zip(groups, take)])).astype(np.int64)

def _display(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) normalised tensor -> (N, H, W, C) float in [0, 1] for plotting
    (per-image min-max: the normalisation constants are not needed)."""
    x = x.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-12)
    return x.permute(0, 2, 3, 1).numpy()


class _TargetOutOfRange(Exception):
    """Internal: captum failed selecting a target the model does not have."""

    def __init__(self, width: int) -> None:
        super().__init__(width)
        self.width = width


# --------------------------------------------------------------------------- result
@dataclass
class AttributionResult:
    """Attribution maps of one method for N images.

    ``maps`` (N, H, W) float32 at input resolution; ``raw`` (N, C, H, W) or None. When the
    run wrote ``attributions.h5`` (``out=``) both are :class:`H5Maps`: array-like views read
    from the file on access (``res.maps[i]``, ``res.maps[a:b]``, ``np.asarray(res.maps)``),
    so that memory stays bounded for large N; so are they, on a temporary file, when a run
    without ``out=`` has more maps than :data:`MAX_IN_MEMORY_MAPS_BYTES`; otherwise they are
    numpy arrays.
    ``targets``/``predictions``/``labels`` (N,) int64; ``ids`` data set ids;
    ``images`` (k, H, W, C) display copies of the first k inputs (for ``plot``) or None.
    """

    maps: np.ndarray | H5Maps
    raw: np.ndarray | H5Maps | None
    targets: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray
    ids: list[str]
    method: str
    params: dict[str, Any]
    model_info: dict[str, Any]
    reduce: str = "abs_sum"
    path: Path | None = None
    images: np.ndarray | None = field(default=None, repr=False)
    #: the model attributed (one name; ``run(..., name=)``, default from the model's info)
    names: tuple[str, ...] = ()
    #: data set row of each map (``run(sample=...)``; rows 0..N-1 for ``sample="first"``)
    indices: np.ndarray | None = None
    #: how the torch threads of the run were chosen
    #: (:func:`interptool._resources.free_core_threads`' record); None when loaded from a file
    threads: dict[str, Any] | None = None

    #: stem of the standard files written by :meth:`save` (see docs/extending.md)
    file_stem = "attribution"

    @property
    def n(self) -> int:
        return int(self.maps.shape[0])

    @property
    def provenance(self) -> dict[str, Any]:
        """What produced the maps: method, settings, reduction, model, file and torch threads."""
        return {"method": self.method, "params": self.params, "reduce": self.reduce,
                "model": self.model_info, "path": str(self.path) if self.path else None,
                "threads": self.threads}

    def summary(self) -> dict[str, Any]:
        """Headline numbers: images, accuracy on them and the mean top-10% mass of the maps."""
        d = self.to_dict()
        return {k: d[k] for k in ("method", "n", "accuracy", "mean_top10_mass")}

    @classmethod
    def load(cls, path: str | Path, method: str | None = None, *,
             lazy: bool = True) -> AttributionResult:
        """Read a complete ``attributions.h5`` (file or its folder) back into a result
        (maps read lazily from the file unless ``lazy=False``)."""
        d = read_attributions(path, method, lazy=lazy)
        p = Path(path)
        return cls(maps=d["maps"], raw=d["raw"], targets=d["targets"],
                   predictions=d["predictions"], labels=d["labels"], ids=d["ids"],
                   method=d["method"], params=d["params"], model_info=d["model_info"],
                   reduce=d["reduce"], path=p / "attributions.h5" if p.is_dir() else p)

    def to_frame(self):
        """One row per image: id, label, target, predicted, correct and map statistics
        (min, max, mean, std, fraction of positive mass in the top 10% of pixels)."""
        import pandas as pd

        stats: dict[str, list[np.ndarray]] = {k: [] for k in (
            "map_min", "map_max", "map_mean", "map_std", "top10_mass")}
        for _, block in iter_blocks(self.maps):  # bounded memory for lazy maps
            flat = block.reshape(len(block), -1).astype(np.float64)
            pos = np.clip(flat, 0, None)
            k = max(1, int(np.ceil(0.1 * flat.shape[1])))
            top = -np.sort(-pos, axis=1)[:, :k].sum(axis=1)
            total = pos.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                stats["top10_mass"].append(np.where(total > 0, top / np.where(
                    total > 0, total, 1), np.nan))
            stats["map_min"].append(flat.min(axis=1))
            stats["map_max"].append(flat.max(axis=1))
            stats["map_mean"].append(flat.mean(axis=1))
            stats["map_std"].append(flat.std(axis=1))
        cols = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in stats.items()}
        return pd.DataFrame({
            "id": self.ids, "label": self.labels, "target": self.targets,
            "predicted": self.predictions, "correct": self.labels == self.predictions,
            **cols,
        })

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no arrays): method, params, model, shapes, accuracy, map stats."""
        frame = self.to_frame()
        labelled = self.labels >= 0
        return {
            "names": list(self.names),
            "method": self.method,
            "params": self.params,
            "reduce": self.reduce,
            "model": self.model_info,
            "n": self.n,
            "map_shape": [int(v) for v in self.maps.shape[1:]],
            "accuracy": (float((self.labels == self.predictions)[labelled].mean())
                         if labelled.any() else None),
            "mean_top10_mass": float(np.nanmean(frame["top10_mass"])) if self.n else None,
            "path": str(self.path) if self.path else None,
            "threads": self.threads,
        }

    def plot(self, n: int = 8, images: np.ndarray | None = None, cmap: str = "jet",
             alpha: float = 0.5):
        """Grid: one column per image, rows = image, map overlay (map alone without images)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        imgs = images if images is not None else self.images
        k = min(n, self.n) if imgs is None else min(n, self.n, len(imgs))
        rows = 1 if imgs is None else 2
        fig, axes = plt.subplots(rows, max(k, 1), figsize=(1.8 * max(k, 1), 1.9 * rows),
                                 squeeze=False)
        shown = np.asarray(self.maps[:k])
        for j in range(k):
            m = shown[j]
            if imgs is not None:
                axes[0, j].imshow(np.squeeze(imgs[j]), cmap="gray" if imgs[j].shape[-1] == 1
                                  else None)
                axes[0, j].set_title(f"{self.ids[j][-14:]}\nt={self.targets[j]}",
                                     fontsize=7)
                axes[1, j].imshow(np.squeeze(imgs[j]), cmap="gray" if imgs[j].shape[-1] == 1
                                  else None)
                axes[1, j].imshow(m, cmap=cmap, alpha=alpha)
            else:
                axes[0, j].imshow(m, cmap=cmap)
                axes[0, j].set_title(f"{self.ids[j][-14:]}", fontsize=7)
        for ax in axes.ravel():
            ax.axis("off")
        fig.suptitle(f"{self.method}", fontsize=9)
        fig.tight_layout()
        return fig

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``attribution.csv`` (``to_frame()``), ``attribution.json`` (``to_dict()``)
        and ``attribution.png`` (:func:`~interptool.analyzers._base.save_result_files`)."""
        from interptool.analyzers._base import save_result_files

        return save_result_files(self, directory)


# --------------------------------------------------------------------------- analyzer
class Attribution:
    """An attribution method by name with its parameters (scikit-learn style).

    Methods: ``saliency``, ``input_x_gradient``, ``integrated_gradients`` (``steps``,
    ``baseline`` zeros|mean|blur, ``internal_batch_size``), ``smoothgrad`` (``nt_samples``,
    ``stdevs``, ``base`` saliency|integrated_gradients, ``seed``), ``guided_backprop``,
    ``grad_cam`` (``layer``), ``occlusion`` (``window``, ``stride``, ``baseline``).
    ``reduce`` (abs_sum|sum|l2|max_abs) turns (N, C, H, W) into (N, H, W).

    After :meth:`run`, ``model_`` is the prepared copy that was used (hooks all removed).
    """

    def __init__(self, method: str = "integrated_gradients", *, reduce: str = "abs_sum",
                 keep_raw: bool = False, **params: Any) -> None:
        if reduce not in REDUCTIONS:
            raise AnalysisError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}")
        self.method = method
        self.reduce = reduce
        self.keep_raw = bool(keep_raw)
        self.adapter = get_method(method, params)
        self.params = dict(self.adapter.params)
        self.model_: nn.Module | None = None

    def __repr__(self) -> str:
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"Attribution({self.method!r}{', ' + ps if ps else ''})"

    def check(self, model_or_loaded: Any, input_shape: Sequence[int],
              device: str = "cpu") -> None:
        """Raise what :meth:`run` would raise before attributing, for the settings that depend
        on the model or the input size (C, H, W): a Grad-CAM layer that is missing or gives no
        spatial map, an occlusion window or stride that does not fit the image. Costs one
        forward pass of one zero image on a private copy of the model for Grad-CAM; the other
        methods' checks need the input size only. Lets a caller check every method before the
        first one runs."""
        model = model_or_loaded.model if _is_loaded(model_or_loaded) else model_or_loaded
        if not isinstance(model, nn.Module):
            raise AnalysisError(f"model must be a LoadedModel or an nn.Module, got "
                                f"{type(model_or_loaded).__name__}")
        # the private copy (a deep copy, moved to ``device``) only where a check runs the model
        prepared = prepare_model(model, device) if self.adapter.check_runs_model else model
        self.adapter.check_model(prepared)
        self.adapter.check_input(prepared, tuple(int(v) for v in input_shape), device,
                                 arch=_arch(model_or_loaded))

    # -- one batch; used by run() and by randomisation_check / benchmarks
    def attribute_batch(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                        start: int = 0, rows: int | None = None) -> torch.Tensor:
        """Raw attribution (N, C', H, W) of a prepared model for one batch (detached);
        ``rows`` bounds the model rows per pass (default: the batch's size)."""
        seed = batch_seed(self.params.get("seed", 0), start)
        # a fresh leaf that requires grad (captum would otherwise warn and set it itself)
        x = x.detach().requires_grad_(True)
        out = self.adapter.attribute(model, x, target, seed=seed,
                                     rows=rows if rows is not None else x.shape[0])
        return out.detach()

    def run(
        self,
        model_or_loaded: Any,
        data: Any,
        *,
        n: int | None = None,
        batch_size: int = 16,
        target: str | int = "label",
        device: str = "cpu",
        out: str | Path | None = None,
        labels: Any = None,
        ids: Sequence[str] | None = None,
        transform: Any = None,
        overwrite: bool = False,
        keep_images: int = 16,
        internal_batch_size: int | None = None,
        sample: str = "stratified",
        sample_seed: int = 0,
        threads: int | None = None,
    ) -> AttributionResult:
        """Attribute ``n`` images (a sample of the data set, or all) in batches.

        Args:
            model_or_loaded: ``LoadedModel`` (its eval transform is used, or its probe
                transform for a BrodenDataset so that masks stay aligned) or an ``nn.Module``.
            data: ``ImageDataset`` or an (N, C, H, W) tensor of model-ready inputs
                (with ``labels`` (N,) and ``ids`` optional).
            target: ``"label"`` (class label; error on unlabelled images), ``"predicted"``
                (arg-max of the logits) or a class index.
            out: folder (or ``.h5`` file) for ``attributions.h5``; a re-run resumes there.
                Without it the maps are numpy arrays in memory up to
                :data:`MAX_IN_MEMORY_MAPS_BYTES` (1 GiB); above, they stream to a temporary
                ``attributions.h5`` (removed once no :class:`H5Maps` view of it is left) and
                ``result.maps`` / ``raw`` are such views, ``result.path`` None.
            keep_images: how many display copies of the inputs the result keeps for plots.
            internal_batch_size: most model rows in one forward/backward pass of methods
                that expand each input (integrated gradients' steps, SmoothGrad's noise
                samples, occlusion's windows); default ``batch_size``, so memory is that of
                one ordinary batch whatever ``steps`` or ``nt_samples``. Below a batch's
                image count the batch is attributed in parts of at most that many images
                (captum alone never runs fewer rows than inputs), and the prediction pass
                is split alike. A method's own explicit setting wins. Does not change the
                maps of deterministic methods; SmoothGrad's parts draw their noise in turn
                from the batch's seeded stream, so its maps depend on the split, which is
                recorded (``params["images_per_part"]``, only when a batch is split).
            sample: with ``n`` below the data set's size, ``"stratified"`` (default, as the
                CLI and the compare config: :func:`stratified_sample`, equal shares per class,
                seeded by ``sample_seed``; the first rows of an image folder are often one
                class) or ``"first"`` (rows 0..n-1). The rows are ``result.indices``, the setting
                ``result.params["sample"]``.
            threads: torch intra-op threads (``--threads``): an explicit number wins (capped
                by the cores this process may use); ``None`` keeps only the cores idle now
                (:func:`interptool._resources.thread_scope`; the choice of an enclosing
                scope, e.g. the compare stage's, is reused). Recorded in
                ``result.threads`` / ``provenance``; torch's setting is restored after.
        """
        if _is_loaded(model_or_loaded):
            model = model_or_loaded.model
            if transform is None and not isinstance(data, torch.Tensor):
                pre = model_or_loaded.preprocessing
                transform = pre.probe_transform() if _is_broden(data) else pre.eval_transform()
        elif isinstance(model_or_loaded, nn.Module):
            model = model_or_loaded
        else:
            raise AnalysisError(
                f"model must be a LoadedModel or an nn.Module, got {type(model_or_loaded).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise AnalysisError(f"batch_size must be a positive int, got {batch_size!r}")
        if internal_batch_size is not None and (not isinstance(internal_batch_size, int)
                                                or internal_batch_size < 1):
            raise AnalysisError(f"internal_batch_size must be a positive int or None, got "
                                f"{internal_batch_size!r}")
        rows = int(internal_batch_size or batch_size)
        if not (target in ("label", "predicted") or (isinstance(target, (int, np.integer))
                                                     and not isinstance(target, bool))):
            raise AnalysisError(f"target must be 'label', 'predicted' or a class index, "
                                f"got {target!r}")
        src = _TensorSource(data, labels=labels, ids=ids, transform=transform, n=n,
                            sample=sample, sample_seed=sample_seed)
        if target == "label" and (src.labels < 0).any():
            bad = int(np.flatnonzero(src.labels < 0)[0])
            raise AnalysisError(
                f"target='label' but image {src.ids[bad]!r} (and maybe others) has no label; "
                "use target='predicted' (--target predicted) or a class index")

        self._known_classes = (int(model_or_loaded.num_classes) if _is_loaded(model_or_loaded)
                               and getattr(model_or_loaded, "num_classes", None) else None)
        # token layout recorded by the loader (class / distillation / register tokens), used
        # by Grad-CAM on transformer blocks; None where unknown (the model's own attributes)
        prefix = getattr(model_or_loaded, "num_prefix_tokens", None)
        grid = getattr(model_or_loaded, "token_grid", None)
        self.adapter.loaded_layout = (
            int(prefix) if isinstance(prefix, int) and not isinstance(prefix, bool) else None,
            tuple(int(v) for v in grid) if isinstance(grid, (tuple, list)) and len(grid) == 2
            else None)
        prepared = prepare_model(model, device)
        self.adapter.check_model(prepared)
        shape = src.input_shape()
        # settings that depend on the model or the input size (a Grad-CAM layer without
        # spatial maps, an occlusion window larger than the image): before any file is made
        self.adapter.check_input(prepared, shape, device, arch=_arch(model_or_loaded))
        self.model_ = prepared
        info = _model_info(model_or_loaded, model, weights_hash=out is not None)
        # what was actually run: the resolved internal batching and the image sample
        # the device type too: a resumed file must not mix maps computed two ways (rounding,
        # and SmoothGrad's noise, which torch draws per device from the same seed)
        params = {**self.adapter.effective_params(rows, batch_size), "sample": src.sample,
                  "device_type": torch.device(device).type}
        if torch.device(device).type == "cuda":  # TF32 convolutions move maps by ~1e-3
            params.update(fp32_precision())

        store = None
        path = None
        temporary = None
        if out is not None:
            path = Path(out)
            if path.suffix not in (".h5", ".hdf5"):
                path = path / "attributions.h5"
        elif _maps_nbytes(src.n, shape, self.keep_raw) > MAX_IN_MEMORY_MAPS_BYTES:
            # memory bounded by default (issue 13): maps that would not fit the in-memory
            # limit go to a private file that lives as long as the views returned on it
            temporary = TemporaryFolder()
            path = temporary.path / "attributions.h5"
        try:
            if path is not None:
                store = AttributionStore(
                    path, method=self.method, params=params, reduce=self.reduce,
                    batch_size=batch_size, model_info=info, data_spec=src.spec,
                    data_fingerprint=src.fingerprint,
                    target_mode=target if isinstance(target, str) else int(target),
                    input_shape=shape, keep_raw=self.keep_raw, overwrite=overwrite,
                    ids=src.ids)
            try:
                # many small forward/backward passes: threads that wait for busy cores cost
                # more than they bring, so only idle cores get one (interptool._resources)
                with thread_scope(threads) as chosen:
                    res = self._run(prepared, src, store, batch_size, target, device, info,
                                    keep_images, rows, params)
            finally:
                if store is not None:
                    store.close()
        except BaseException:
            if temporary is not None:  # nothing will read it: do not wait for the GC
                temporary.cleanup()
            raise
        res.threads = dict(chosen)
        if store is not None:
            # maps written to the file are read back lazily: memory stays bounded for any N
            res.maps = H5Maps(store.path, f"attributions/{self.method}", src.n,
                              keep_alive=temporary)
            if self.keep_raw:
                res.raw = H5Maps(store.path, f"attributions/{self.method}_raw", src.n,
                                 keep_alive=temporary)
        if temporary is not None:
            res.path = None  # a private file, gone with its views: nothing to reopen
        return res

    def _run(self, model, src, store, batch_size, target, device, info, keep_images, rows,
             params):
        n = src.n
        start0 = min(store.n_done, n) if store is not None else 0
        parts: dict[str, list] = {k: [] for k in ("maps", "raw", "targets", "predictions")}
        # with a file, maps go to disk batch by batch and are never gathered in memory
        lazy = store is not None
        if start0 > 0:
            done = store.read_rows(start0, maps=False)
            for k in ("targets", "predictions"):
                parts[k].append(done[k])
        images = None
        if keep_images:
            images = _display(src.batch(0, min(keep_images, n)))
        # known up front for a LoadedModel; otherwise read off the first forward pass
        num_classes = self._known_classes
        with progress(total=n, desc=f"attribution {self.method}", unit="img") as bar:
            bar.update(start0)
            start = start0
            while start < n:
                # batches stay aligned to multiples of batch_size (seeds depend on starts)
                stop = min(n, (start // batch_size + 1) * batch_size)
                x = src.batch(start, stop).to(device=device, dtype=torch.float32)
                if num_classes is None and x.device.type != "cpu" and target != "predicted":
                    # an out-of-range target makes captum's gather a device-side assert on a
                    # GPU (reported later, outside any handler, and the CUDA context is lost),
                    # not the IndexError the CPU raises: learn the width first (one image)
                    with torch.no_grad():
                        num_classes = _output_width(model(x[:1]))
                preds = None
                if target == "predicted":
                    preds = _logits(model, x, rows).argmax(dim=1)
                tgt = self._targets(target, src.labels[start:stop], preds, num_classes,
                                    src.ids[start:stop])
                try:
                    raw, logits, width = self._attribute_capturing(model, x, tgt, device, start,
                                                                   src.ids[start:stop], rows)
                except _TargetOutOfRange as exc:  # raises the AnalysisError naming the image
                    self._targets(target, src.labels[start:stop], preds, exc.width,
                                  src.ids[start:stop])
                    raise
                if num_classes is None:
                    num_classes = width
                    self._targets(target, src.labels[start:stop], preds, num_classes,
                                  src.ids[start:stop])
                if preds is None:
                    if logits is None:  # the method never ran the model on x itself
                        logits = _logits(model, x, rows)
                    preds = logits.argmax(dim=1)
                if tuple(raw.shape[-2:]) != tuple(x.shape[-2:]):
                    raise AnalysisError(f"{self.method} produced maps of size "
                                        f"{tuple(raw.shape[-2:])} for inputs {tuple(x.shape[-2:])}")
                maps = _reduce(raw, self.reduce).float().cpu().numpy()
                self._check_finite(maps, logits, src.ids[start:stop], store)
                raw_np = raw.float().cpu().numpy() if self.keep_raw else None
                tg = tgt.cpu().numpy().astype(np.int64)
                pr = preds.cpu().numpy().astype(np.int64)
                if store is not None:
                    store.append(start, maps, raw_np, src.ids[start:stop],
                                 src.labels[start:stop], tg, pr)
                parts["targets"].append(tg)
                parts["predictions"].append(pr)
                if not lazy:
                    parts["maps"].append(maps)
                    if raw_np is not None:
                        parts["raw"].append(raw_np)
                bar.update(stop - start)
                start = stop
        if store is not None:
            store.finish()
        h, w = src.input_shape()[1:]
        cat = (lambda k, shape, dt: np.concatenate(parts[k]) if parts[k]  # noqa: E731
               else np.zeros(shape, dt))
        return AttributionResult(
            maps=cat("maps", (0, h, w), np.float32).astype(np.float32),
            raw=np.concatenate(parts["raw"]) if self.keep_raw and parts["raw"] else None,
            targets=cat("targets", (0,), np.int64),
            predictions=cat("predictions", (0,), np.int64),
            labels=src.labels.copy(), ids=list(src.ids), method=self.method,
            params=dict(params), model_info=info, reduce=self.reduce,
            path=store.path if store is not None else None, images=images,
            indices=src.indices.copy())

    def _attribute_capturing(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                             device: str, start: int, ids: Sequence[str],
                             rows: int | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """Attribute; also return the logits of captum's own forward pass on ``x`` when it
        makes one (saliency, grad_cam, occlusion, ...), which saves a prediction pass, and the
        model's output width (to check targets without an extra forward pass). The hook sits
        on our private copy and is removed before returning."""
        seed = batch_seed(self.params.get("seed", 0), start)
        # a fresh leaf that requires grad (captum would otherwise warn and set it itself)
        xg = x.detach().requires_grad_(True)
        seen: list[torch.Tensor] = []
        width: list[int] = []

        def grab(_module, inputs, output):
            if not isinstance(output, torch.Tensor):
                return
            if not width:
                width.append(_output_width(output))
            if not seen and inputs and inputs[0] is xg:
                seen.append(output.detach())

        handle = model.register_forward_hook(grab)
        try:
            raw = self.adapter.attribute(model, xg, target.to(device), seed=seed,
                                         rows=rows).detach()
        except (IndexError, RuntimeError) as exc:
            # captum fails on an out-of-range target while selecting it: say why
            if width and bool((target >= width[0]).any()):
                raise _TargetOutOfRange(width[0]) from exc
            raise
        finally:
            handle.remove()
        logits = seen[0] if seen else None
        return raw, logits, (width[0] if width else None)

    def _check_finite(self, maps: np.ndarray, logits: torch.Tensor | None,
                      ids: Sequence[str], store: Any) -> None:
        """Refuse NaN / inf maps (or logits) before they are stored or scored."""
        bad = ~np.isfinite(maps.reshape(len(maps), -1)).all(axis=1)
        what = "attribution map"
        if logits is not None and not bool(torch.isfinite(logits).all()):
            bad |= ~torch.isfinite(logits).all(dim=1).cpu().numpy()
            what = "logits / attribution map"
        if not bad.any():
            return
        i = int(np.flatnonzero(bad)[0])
        where = f" (writing {store.path})" if store is not None else ""
        raise AnalysisError(
            f"{self.method}: the {what} of image {ids[i]!r} holds NaN or inf{where}; "
            "expected finite values. The model produces non-finite outputs or gradients (NaN "
            "weights, overflow): check the checkpoint (interptool layers / cache with "
            "--dtype float32) before attributing.")

    @staticmethod
    def _targets(target, labels, preds, num_classes, ids) -> torch.Tensor:
        if target == "predicted":
            return preds.detach().cpu().long()
        if target == "label":
            t = torch.as_tensor(labels, dtype=torch.long)
            what = "label"
        else:
            t = torch.full((len(labels),), int(target), dtype=torch.long)
            what = "target"
        bad = (t < 0) | (t >= num_classes) if num_classes is not None else t < 0
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            raise AnalysisError(
                f"{what} {int(t[i])} of image {ids[i]!r} is out of range: the model has "
                f"{num_classes} outputs (valid 0..{num_classes - 1}); check --num-classes "
                "or the target")
        return t


def _arch(model_or_loaded: Any) -> str | None:
    """The architecture spec of a LoadedModel (for messages), None for a bare module."""
    arch = getattr(model_or_loaded, "arch", None) if _is_loaded(model_or_loaded) else None
    return str(arch) if arch else None


def _logits(model: nn.Module, x: torch.Tensor, rows: int | None) -> torch.Tensor:
    """The model's output on ``x`` without gradients, at most ``rows`` inputs per forward
    pass (the bound of the attribution passes holds for the prediction pass too)."""
    with torch.no_grad():
        if rows is None or rows >= x.shape[0]:
            return model(x)
        return torch.cat([model(x[s:s + rows]) for s in range(0, x.shape[0], rows)])


def _output_width(logits: Any) -> int:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise AnalysisError(f"model output must be (N, classes) logits, got "
                            f"{tuple(getattr(logits, 'shape', ()))}; attribution needs a "
                            "classifier")
    return int(logits.shape[1])


def _maps_nbytes(n: int, input_shape: tuple[int, int, int], keep_raw: bool) -> int:
    """Bytes of ``n`` float32 maps (N, H, W), plus raw maps (N, C, H, W) with ``keep_raw``."""
    c, h, w = input_shape
    return 4 * int(n) * h * w * (1 + (c if keep_raw else 0))


def _reduce(raw: torch.Tensor, how: str) -> torch.Tensor:
    from interptool.analyzers.attribution._methods import reduce_channels

    return reduce_channels(raw, how)
