"""Class similarity from logits, and how much of a teacher's class similarity a student shares.

* :class:`ClassSimilarity` -- per model: ``S[i, j]`` = mean over the samples of true class i of
  ``softmax(z / T)[j]`` for several temperatures, its "dark knowledge" variant (target class
  removed and renormalised), cosine similarity of class-mean logits, within-class entropies.
* :func:`compare_similarity` -- teacher vs one or more students on the same images: agreement of
  the matrices (Pearson, Spearman, KL, Jensen-Shannon, top-k nearest-class overlap), top-1
  agreement, accuracies, optional agreement with a class hierarchy, each with a paired bootstrap
  CI, and CIs of every student-minus-student difference.

Definitions, conventions and costs are documented in docs/similarity.md.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from interptool._progress import progress
from interptool.analyzers.similarity._core import (
    BootstrapEvaluator,
    Reference,
    SortedLabels,
    StackedSamples,
    as_temperatures,
    bootstrap_dtype,
    bootstrap_weights,
    fmt_t,
    kernels_pay_off,
    normalise_rows,
    semantic_spearman,
    softmax_stats,
    topk_neighbours,
    weighted_counts,
)
from interptool.common.jsonsafe import to_jsonable
from interptool.common.stats import interval_from_resamples
from interptool.common.theme import themed
from interptool.errors import AnalysisError

__all__ = [
    "ClassSimilarity",
    "SimilarityResult",
    "compare_similarity",
    "TransferResult",
]

MATRIX_KINDS = ("softmax", "dark_knowledge")
PAIR_METRICS = ("pearson", "spearman", "kl", "js_distance", "topk_overlap")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
@dataclass
class _Logits:
    """What the similarity analyses need from a cache (read once; the file is then closed)."""

    name: str
    path: str
    logits: np.ndarray
    labels: np.ndarray
    ids: list[str]
    data_fingerprint: str
    model_info: dict[str, Any] | None
    class_names: list[str] | None
    checkpoint_sha256: str = ""


def _decode_names(value: Any) -> list[str] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value]
    return None


def _read(cache: Any) -> _Logits:
    """Accept an ActivationCache, a path to one, or any object with the same attributes."""
    if isinstance(cache, (str, os.PathLike)):
        from interptool.cache import ActivationCache

        with ActivationCache(cache) as c:
            return _read(c)
    try:
        logits = np.asarray(cache.logits, dtype=np.float32)
        labels = np.asarray(cache.labels, dtype=np.int64)
    except AttributeError:
        raise AnalysisError(
            f"expected an ActivationCache or the path of a cache file, got {type(cache).__name__}"
        ) from None
    attrs = dict(getattr(cache, "attrs", {}) or {})
    names = _decode_names(attrs.get("class_names"))
    extra = attrs.get("extra")
    if names is None and isinstance(extra, dict):
        names = _decode_names(extra.get("class_names"))
    info = getattr(cache, "model_info", None)
    if names is None and isinstance(info, dict):
        names = _decode_names(info.get("class_names"))
    path = str(getattr(cache, "path", "<memory>"))
    return _Logits(
        name=str(getattr(cache, "name", Path(path).stem)),
        path=path,
        logits=logits,
        labels=labels,
        ids=list(getattr(cache, "ids", [str(i) for i in range(len(labels))])),
        data_fingerprint=str(getattr(cache, "data_fingerprint", "") or ""),
        model_info=info,
        class_names=names,
        checkpoint_sha256=str(attrs.get("checkpoint_sha256", "") or ""),
    )


def _check_one(d: _Logits) -> int:
    if d.logits.ndim != 2 or d.logits.shape[0] != d.labels.shape[0]:
        raise AnalysisError(
            f"{d.path}: /logits has shape {d.logits.shape} but /labels has {d.labels.shape[0]} "
            "rows; expected logits (N, K) with one label per row. Re-create the cache."
        )
    k = d.logits.shape[1]
    if d.logits.shape[0] == 0:
        raise AnalysisError(f"{d.path}: the cache holds no images; cache a labelled data set "
                            "(imagefolder:, csv: with labels) and run again")
    if k < 2:
        raise AnalysisError(f"{d.path}: logits have {k} class(es); class similarity needs K >= 2")
    if not np.isfinite(d.logits).all():
        rows = np.flatnonzero(~np.isfinite(d.logits).all(axis=1))
        first = int(rows[0])
        image = d.ids[first] if first < len(d.ids) else f"row {first}"
        raise AnalysisError(
            f"{d.path}: /logits has NaN or inf in {rows.size} of {d.logits.shape[0]} rows, "
            f"first at row {first} (image {image!r}); expected finite logits. The model "
            "diverged (NaN weights) or float16 overflowed: re-create the cache from a working "
            "checkpoint (with --dtype float32)."
        )
    if d.class_names and len(d.class_names) != k:
        shown = ", ".join(map(str, d.class_names[:5])) + (", ..." if len(d.class_names) > 5
                                                          else "")
        raise AnalysisError(
            f"{d.path}: the cached data set has {len(d.class_names)} classes ({shown}) but the "
            f"model has K = {k} outputs; the labels must be the model's class indices: cache "
            "the data set the model was trained on (an image folder's classes are its "
            "sub-folders in sorted order)")
    if (d.labels >= k).any():
        raise AnalysisError(
            f"{d.path}: labels go up to {int(d.labels.max())} but the model has K = {k} "
            "outputs; the data set's label space does not match the model's "
            "(use a data set with the model's classes, or --num-classes)."
        )
    if not (d.labels >= 0).any():
        raise AnalysisError(
            f"{d.path}: no labelled images (all labels are -1); class similarity needs the "
            "true class of each image. Cache a labelled data set (imagefolder:, csv: with labels)."
        )
    return k


def _class_names(d: _Logits, k: int) -> list[str]:
    if d.class_names is not None and len(d.class_names) == k:
        return list(d.class_names)
    return [str(i) for i in range(k)]


def load_class_names(spec: str | os.PathLike | Sequence[str], k: int | None = None) -> list[str]:
    """Class names from a list, or from a file: JSON list, or text with one name per line
    (``classes.txt``; blank lines skipped). ``k``: the number of outputs they must match."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise AnalysisError(
                f"{path}: class-names file not found (expected a text file with one class name "
                "per line, in the model's output order, or a JSON list)"
            )
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".json":
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise AnalysisError(f"{path}: not valid JSON ({exc})") from None
            names = _decode_names(value)
            if names is None:
                raise AnalysisError(f"{path}: expected a JSON list of class names")
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        src = str(path)
    else:
        names, src = [str(v) for v in spec], "class_names"
    if k is not None and len(names) != k:
        raise AnalysisError(
            f"{src}: {len(names)} class names but the models have K = {k} outputs; give one "
            "name per output, in the model's output order"
        )
    return names


def _check_same_data(teacher: _Logits, other: _Logits) -> None:
    """Teacher and student must have been cached on the same images, in the same order."""
    from interptool.common.alignment import ImageSet, check_same_images

    check_same_images(
        ImageSet(f"the teacher cache {teacher.path}", teacher.ids, teacher.data_fingerprint,
                 teacher.labels),
        ImageSet(other.path, other.ids, other.data_fingerprint, other.labels),
        fix="Re-create both caches with the same --data spec (same images, same order) so the "
            "comparison is per image.")
    kt, ko = teacher.logits.shape[1], other.logits.shape[1]
    if kt != ko:
        raise AnalysisError(
            f"label spaces differ: {teacher.path} has K = {kt} outputs, {other.path} has "
            f"K = {ko}; class similarity can only be compared between models over the same "
            "classes (same order)."
        )
    if (teacher.class_names and other.class_names
            and list(teacher.class_names) != list(other.class_names)):
        raise AnalysisError(
            f"class names differ between {teacher.path} and {other.path}; both models must "
            "use the same classes in the same order."
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def _unique_names(ds: Sequence[_Logits]) -> list[str]:
    names = [d.name for d in ds]
    if len(set(names)) < len(names):
        names = [Path(d.path).stem if d.path != "<memory>" else d.name for d in ds]
    out: list[str] = []
    for n in names:
        cand, i = n, 2
        while cand in out:
            cand, i = f"{n}#{i}", i + 1
        out.append(cand)
    return out


# --------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------
@dataclass
class SimilarityResult:
    """Class-similarity statistics of one model (see :class:`ClassSimilarity`).

    Attributes: ``matrices`` {T: S (K, K)}, ``dark_knowledge`` {T: S_dk (K, K)}, ``cosine``
    (K, K), ``entropy`` {T: (K,)} and ``entropy_overall`` {T: float} (nats),
    ``nontarget_entropy`` / ``nontarget_entropy_overall`` likewise, ``counts`` (K,),
    ``class_accuracy`` (K,), ``accuracy``, ``empty_classes`` (indices with no samples; their
    rows are NaN), ``class_names``, ``name``, ``source``.
    """

    name: str
    source: str
    temperatures: list[float]
    matrices: dict[float, np.ndarray]
    dark_knowledge: dict[float, np.ndarray]
    cosine: np.ndarray
    entropy: dict[float, np.ndarray]
    entropy_overall: dict[float, float]
    nontarget_entropy: dict[float, np.ndarray]
    nontarget_entropy_overall: dict[float, float]
    counts: np.ndarray
    class_accuracy: np.ndarray
    accuracy: float
    empty_classes: list[int]
    class_names: list[str]
    n: int
    data_fingerprint: str = ""
    model_info: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        return int(self.cosine.shape[0])

    def nearest(self, k: int = 5, temperature: float | None = None,
                matrix: str = "softmax") -> np.ndarray:
        """(K, k) indices of each class's k most similar other classes (ties: lower index)."""
        t = self.temperatures[0] if temperature is None else float(temperature)
        S = (self.dark_knowledge if matrix == "dark_knowledge" else self.matrices)[t]
        return topk_neighbours(S, min(k, self.num_classes - 1))

    def to_frame(self) -> pd.DataFrame:
        """One row per class: size, accuracy, and per temperature the mean entropy (nats and
        normalised by log K) and non-target entropy (normalised by log(K - 1))."""
        k = self.num_classes
        df = pd.DataFrame({
            "class": np.arange(k),
            "class_name": self.class_names,
            "n": self.counts.astype(int),
            "accuracy": self.class_accuracy,
        })
        for t in self.temperatures:
            s = fmt_t(t)
            df[f"entropy_T{s}"] = self.entropy[t]
            df[f"entropy_norm_T{s}"] = self.entropy[t] / np.log(k)
            df[f"nontarget_entropy_T{s}"] = self.nontarget_entropy[t]
            df[f"nontarget_entropy_norm_T{s}"] = self.nontarget_entropy[t] / np.log(k - 1) if k > 2 else np.nan
        return df

    def summary(self) -> dict[str, Any]:
        k = self.num_classes
        per_t = {}
        for t in self.temperatures:
            per_t[fmt_t(t)] = {
                "entropy": self.entropy_overall[t],
                "entropy_norm": self.entropy_overall[t] / np.log(k),
                "nontarget_entropy": self.nontarget_entropy_overall[t],
                "nontarget_entropy_norm": (self.nontarget_entropy_overall[t] / np.log(k - 1)
                                           if k > 2 else None),
            }
        return {"accuracy": self.accuracy, "temperatures": per_t}

    def to_dict(self, include_matrices: bool | None = None) -> dict[str, Any]:
        """JSON-safe summary; the K x K matrices are included when ``include_matrices`` (by
        default only for K <= 200, to keep files small)."""
        if include_matrices is None:
            include_matrices = self.num_classes <= 200
        out: dict[str, Any] = {
            "name": self.name,
            "source": self.source,
            "n": self.n,
            "num_classes": self.num_classes,
            "data_fingerprint": self.data_fingerprint,
            "model": self.model_info,
            "class_names": self.class_names,
            "empty_classes": self.empty_classes,
            **self.summary(),
            "per_class": self.to_frame().to_dict(orient="list"),
        }
        if include_matrices:
            out["matrices"] = {fmt_t(t): self.matrices[t] for t in self.temperatures}
            out["dark_knowledge"] = {fmt_t(t): self.dark_knowledge[t] for t in self.temperatures}
            out["cosine"] = self.cosine
        return to_jsonable(out)

    @themed
    def plot(self, temperature: float | None = None, matrix: str = "softmax",
             order: np.ndarray | None = None):
        """Heatmap of S (diagonal hidden; clustered order; block-averaged beyond 100 classes)."""
        import matplotlib.pyplot as plt

        from interptool.analyzers.similarity._plots import cluster_order, heatmap

        t = self.temperatures[0] if temperature is None else float(temperature)
        S = (self.dark_knowledge if matrix == "dark_knowledge" else self.matrices)[t]
        order = cluster_order(S) if order is None else order
        fig, ax = plt.subplots(figsize=(6, 5.4))
        im = heatmap(ax, S, order, self.class_names, f"{self.name}: {matrix} S, T={fmt_t(t)}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        return fig

    def save(self, directory: str | os.PathLike, prefix: str | None = None) -> list[Path]:
        """Write per-class CSV, matrix CSVs (per T: softmax, dark knowledge; cosine), a JSON
        summary and a heatmap per T. Returns the paths written."""
        import matplotlib.pyplot as plt

        from interptool._provenance import atomic_savefig, atomic_write_text

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        pre = _safe(prefix or self.name)
        paths: list[Path] = []
        p = d / f"{pre}_classes.csv"
        atomic_write_text(p, self.to_frame().to_csv(index=False))
        paths.append(p)
        names = self.class_names
        for t in self.temperatures:
            for kind, mats in (("softmax", self.matrices), ("dark_knowledge", self.dark_knowledge)):
                p = d / f"{pre}_T{fmt_t(t)}_{kind}.csv"
                atomic_write_text(p, pd.DataFrame(mats[t], index=names, columns=names).to_csv())
                paths.append(p)
            fig = self.plot(t)
            p = d / f"{pre}_T{fmt_t(t)}_heatmap.png"
            atomic_savefig(fig, p, dpi=120)
            plt.close(fig)
            paths.append(p)
        p = d / f"{pre}_cosine.csv"
        atomic_write_text(p, pd.DataFrame(self.cosine, index=names, columns=names).to_csv())
        paths.append(p)
        p = d / f"{pre}_similarity.json"
        atomic_write_text(p, json.dumps(self.to_dict(), indent=1))
        paths.append(p)
        return paths


class ClassSimilarity:
    """Class-similarity matrices of one model from its cached logits.

    ``S_T[i, j]`` is the mean, over the images whose true class is ``i``, of
    ``softmax(z / T)[j]``: each row is a probability distribution. The dark-knowledge matrix
    ``S_dk`` averages instead the distribution over the *non-target* classes (the image's own
    class removed, the rest renormalised), so its diagonal is 0 by construction and its rows
    sum to 1 over the other K - 1 classes. ``cosine`` is the cosine similarity of the
    class-mean logit vectors (temperature-free). Entropies are in nats; the within-class
    entropy of class i is the mean of H(softmax(z / T)) over its images, ``entropy_overall``
    the mean over the non-empty classes (each class weighted equally).

    Unlabelled images (label -1) are ignored. Classes without images are listed in
    ``empty_classes`` and their rows (and entropies) are NaN, never dropped.

    Memory is bounded: images are processed class by class in float64; cost is O(N K) per
    temperature (50,000 x 1,000 logits take a few seconds).

    Parameters
    ----------
    temperature: one temperature or a list of them (all positive).
    class_names: K names (list, or a classes.txt / JSON file) used for labels and tables;
        default: the cache's ``class_names`` attribute if any, else "0" .. "K-1".
    device: accepted for a uniform analyzer API; this single O(N K) pass runs in NumPy on
        the CPU (seconds for 50,000 x 1,000). The device matters in :func:`compare_similarity`,
        whose bootstrap matmuls run on it.
    """

    def __init__(self, temperature: float | Sequence[float] = 1.0, *,
                 class_names: str | os.PathLike | Sequence[str] | None = None,
                 device: str = "cpu") -> None:
        self.temperature = temperature
        self.class_names = class_names
        self.device = device

    def run(self, cache: Any) -> SimilarityResult:
        """Compute the statistics of ``cache`` (an ActivationCache or the path of one)."""
        temps = as_temperatures(self.temperature)
        d = cache if isinstance(cache, _Logits) else _read(cache)
        k = _check_one(d)
        if self.class_names is not None:
            d.class_names = load_class_names(self.class_names, k)
        return _similarity_of(d, temps, k, self.device)


def _similarity_of(d: _Logits, temps: list[float], k: int, device: str,
                   class_sums: dict[float, np.ndarray] | None = None) -> SimilarityResult:
    """One model's :class:`SimilarityResult`. ``class_sums`` (per temperature, (K, 2 K + 2)
    as :meth:`StackedSamples.point_sums` gives them for one model) skips the softmax pass
    when the caller has already made it."""
    sl = SortedLabels.build(d.labels, k)
    counts = sl.counts.astype(np.float64)
    matrices, dks, ent, ent_all, nte, nte_all = {}, {}, {}, {}, {}, {}
    valid = counts > 0
    for t in temps:
        if class_sums is not None:
            cs = class_sums[t]
            sums, dsums, hs, hqs = cs[:, :k], cs[:, k:2 * k], cs[:, 2 * k], cs[:, 2 * k + 1]
        else:
            # one class at a time (bounded memory); float64 sums; empty classes stay NaN
            sums = np.full((k, k), np.nan)
            dsums = np.full((k, k), np.nan)
            hs = np.full(k, np.nan)
            hqs = np.full(k, np.nan)
            for i in np.flatnonzero(valid):
                z = d.logits[sl.order[sl.starts[i]:sl.stops[i]]].astype(np.float64) / t
                p, h = softmax_stats(z)
                q, hq = softmax_stats(z, np.full(z.shape[0], i))
                sums[i], dsums[i], hs[i], hqs[i] = p.sum(0), q.sum(0), h.sum(), hq.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            matrices[t] = sums / counts[:, None]
            dks[t] = dsums / counts[:, None]
            ent[t] = hs / counts
            nte[t] = hqs / counts
        ent_all[t] = float(np.nanmean(ent[t]))
        nte_all[t] = float(np.nanmean(nte[t]))
    # cosine of class-mean logits: class sums of raw logits via the same sorted segments
    lab = d.labels >= 0
    mean_logits = np.full((k, k), np.nan)
    for i in np.flatnonzero(valid):
        mean_logits[i] = d.logits[sl.order[sl.starts[i]:sl.stops[i]]].mean(0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        norms = np.linalg.norm(mean_logits, axis=1)
        cosine = (mean_logits @ mean_logits.T) / np.outer(norms, norms)
    cosine[~valid] = np.nan
    cosine[:, ~valid] = np.nan
    correct = (d.logits.argmax(1) == d.labels) & lab
    with np.errstate(invalid="ignore", divide="ignore"):
        class_acc = np.bincount(d.labels[lab], weights=correct[lab], minlength=k) / counts
    return SimilarityResult(
        name=d.name,
        source=d.path,
        temperatures=temps,
        matrices=matrices,
        dark_knowledge=dks,
        cosine=cosine,
        entropy=ent,
        entropy_overall=ent_all,
        nontarget_entropy=nte,
        nontarget_entropy_overall=nte_all,
        counts=counts.astype(np.int64),
        class_accuracy=class_acc,
        accuracy=float(correct.sum() / lab.sum()),
        empty_classes=[int(i) for i in np.flatnonzero(~valid)],
        class_names=_class_names(d, k),
        n=int(d.labels.shape[0]),
        data_fingerprint=d.data_fingerprint,
        model_info=d.model_info,
    )


# --------------------------------------------------------------------------------------------
# teacher vs students
# --------------------------------------------------------------------------------------------

@dataclass
class TransferResult:
    """Teacher-student class-similarity transfer with bootstrap confidence intervals.

    ``estimates`` is a long table, one row per (model, temperature, metric): columns ``model``,
    ``role`` (teacher / student / difference), ``reference`` (what it is compared with),
    ``temperature`` (NaN for temperature-free metrics), ``metric``, ``value`` (on all images),
    ``ci_low``, ``ci_high`` (bias-corrected percentile bootstrap, always containing the value),
    ``bias`` (mean of the resamples minus the estimate), ``ci_widened`` (True where BC alone
    missed the value and the nearer bound was moved to it), ``n_boot``. ``similarity`` maps model name to its
    :class:`SimilarityResult`; ``bootstrap`` maps "model|T|metric" to the resampled values.
    """

    teacher: str
    students: list[str]
    temperatures: list[float]
    k: int
    matrix: str
    n_boot: int
    seed: int
    ci: float
    estimates: pd.DataFrame
    similarity: dict[str, SimilarityResult]
    bootstrap: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    semantic: np.ndarray | None = field(repr=False, default=None)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    hierarchy: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    #: stem of the standard files written by :meth:`save` (see docs/extending.md)
    file_stem = "similarity"

    @property
    def models(self) -> list[str]:
        return [self.teacher, *self.students]

    @property
    def names(self) -> tuple[str, ...]:
        """The models described: the teacher, then each student."""
        return (self.teacher, *self.students)

    def summary(self) -> dict[str, Any]:
        """Headline numbers: per student, Spearman with the teacher and top-1 agreement at the
        first temperature, each ``{"value", "ci_low", "ci_high"}``."""
        t0 = self.temperatures[0]
        out: dict[str, Any] = {"teacher": self.teacher, "temperature": t0, "students": {}}
        est = self.estimates
        for m in self.students:
            row: dict[str, Any] = {}
            for metric, per_t in (("spearman", True), ("js_distance", True),
                                  ("top1_agreement", False)):
                sel = est[(est["model"] == m) & (est["metric"] == metric)
                          & (est["role"] == "student")]
                if per_t:
                    sel = sel[sel["temperature"] == t0]
                if len(sel):
                    r = sel.iloc[0]
                    row[metric] = {"value": r["value"], "ci_low": r["ci_low"],
                                   "ci_high": r["ci_high"]}
            out["students"][m] = row
        return to_jsonable(out)

    def to_frame(self) -> pd.DataFrame:
        return self.estimates.copy()

    def value(self, model: str, metric: str, temperature: float | None = None) -> pd.Series:
        """The row (value, ci_low, ci_high, ...) of one model / metric / temperature."""
        df = self.estimates
        sel = (df["model"] == model) & (df["metric"] == metric)
        if temperature is None:
            temps = df.loc[sel, "temperature"]
            if temps.notna().any():
                sel &= df["temperature"] == self.temperatures[0]
        else:
            sel &= df["temperature"] == float(temperature)
        rows = df[sel]
        if rows.empty:
            raise KeyError(f"no estimate for model={model!r}, metric={metric!r}, T={temperature}")
        return rows.iloc[0]

    def _matrix(self, model: str, t: float) -> np.ndarray:
        res = self.similarity[model]
        return (res.dark_knowledge if self.matrix == "dark_knowledge" else res.matrices)[t]

    def nearest_frame(self) -> pd.DataFrame:
        """Per class, each model's k nearest classes ("a; b; c", most similar first), per T."""
        names = self.similarity[self.teacher].class_names
        out = pd.DataFrame({"class": np.arange(len(names)), "class_name": names})
        kk = min(self.k, len(names) - 1)
        for t in self.temperatures:
            for m in self.models:
                nb = topk_neighbours(self._matrix(m, t), kk)
                empty = set(self.similarity[m].empty_classes)
                col = f"{m} (T={fmt_t(t)})" if len(self.temperatures) > 1 else m
                out[col] = ["" if i in empty else "; ".join(names[j] for j in row)
                            for i, row in enumerate(nb)]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: settings, provenance and every scalar with its CI."""
        from interptool._provenance import provenance

        return to_jsonable({
            "teacher": self.teacher,
            "students": self.students,
            "settings": {
                "temperatures": self.temperatures, "k": self.k, "matrix": self.matrix,
                "n_boot": self.n_boot, "seed": self.seed, "ci": self.ci,
                "ci_method": ("bias-corrected (BC) percentile bootstrap over images, paired across "
                              "models; an interval that would miss its estimate is widened to "
                              "it (ci_widened) and the bias is reported"),
                "kl": "mean over classes of KL(S_teacher[i] || S_student[i]), nats, eps 1e-12",
                "js_distance": "mean over classes of sqrt(JS divergence in bits), in [0, 1]",
                "hierarchy": self.hierarchy,
            },
            "inputs": self.inputs,
            "estimates": self.estimates.to_dict(orient="records"),
            "models": {m: self.similarity[m].summary() for m in self.models},
            "empty_classes": self.similarity[self.teacher].empty_classes,
            "provenance": self.provenance or provenance(),
        })

    @themed
    def plot(self, temperature: float | None = None) -> list:
        """[heatmaps of every model's S in the teacher's clustered class order,
        teacher-vs-student scatter of off-diagonal entries]."""
        import matplotlib.pyplot as plt

        from interptool.analyzers.similarity._plots import (
            cluster_order,
            color_limit,
            heatmap,
            scatter_offdiag,
        )

        t = self.temperatures[0] if temperature is None else float(temperature)
        names = self.similarity[self.teacher].class_names
        # every panel: the teacher's clustered class order and one colour scale
        order = cluster_order(self._matrix(self.teacher, t))
        vmax = color_limit([self._matrix(m, t) for m in self.models], order)
        n = len(self.models)
        fig1, axes = plt.subplots(1, n, figsize=(4.6 * n, 4.6), squeeze=False)
        for ax, m in zip(axes[0], self.models):
            im = heatmap(ax, self._matrix(m, t), order, names,
                         f"{m} ({self.matrix}, T={fmt_t(t)})", vmax=vmax)
            fig1.colorbar(im, ax=ax, fraction=0.046)
        fig1.suptitle("classes in the teacher's clustered order; diagonal hidden", fontsize=8)
        fig1.tight_layout()
        ns = max(1, len(self.students))
        fig2, axes2 = plt.subplots(1, ns, figsize=(4.4 * ns, 4.2), squeeze=False)
        for ax, m in zip(axes2[0], self.students):
            r = self.value(m, "spearman", t)
            scatter_offdiag(ax, self._matrix(self.teacher, t), self._matrix(m, t),
                            f"{m} vs {self.teacher}: Spearman {r['value']:.3f}", seed=self.seed)
        fig2.tight_layout()
        return [fig1, fig2]

    def save(self, directory: str | os.PathLike) -> list[Path]:
        """Write the standard files (similarity.csv = the estimates, similarity.json =
        ``to_dict()``; see :func:`interptool.analyzers._base.save_result_files`), then
        transfer.csv (the estimates under their historic name), nearest_classes.csv, the
        matrices of every model per T (CSV, under matrices/) and the figures per T."""
        import matplotlib.pyplot as plt

        from interptool._provenance import atomic_savefig, atomic_write_text
        from interptool.analyzers._base import save_result_files

        d = Path(directory)
        paths = save_result_files(self, d, figures=False)
        p = d / "transfer.csv"
        atomic_write_text(p, self.estimates.to_csv(index=False))
        paths.append(p)
        p = d / "nearest_classes.csv"
        atomic_write_text(p, self.nearest_frame().to_csv(index=False))
        paths.append(p)
        names = self.similarity[self.teacher].class_names
        mdir = d / "matrices"
        mdir.mkdir(exist_ok=True)
        for m in self.models:
            res = self.similarity[m]
            for t in self.temperatures:
                for kind, mats in (("softmax", res.matrices), ("dark_knowledge", res.dark_knowledge)):
                    p = mdir / f"{_safe(m)}_T{fmt_t(t)}_{kind}.csv"
                    atomic_write_text(p, pd.DataFrame(mats[t], index=names, columns=names).to_csv())
                    paths.append(p)
            p = mdir / f"{_safe(m)}_cosine.csv"
            atomic_write_text(p, pd.DataFrame(res.cosine, index=names, columns=names).to_csv())
            paths.append(p)
            p = d / f"{_safe(m)}_classes.csv"
            atomic_write_text(p, res.to_frame().to_csv(index=False))
            paths.append(p)
        for t in self.temperatures:
            figs = self.plot(t)
            for fig, stem in zip(figs, ("heatmaps", "scatter")):
                p = d / f"{stem}_T{fmt_t(t)}.png"
                atomic_savefig(fig, p, dpi=120)
                plt.close(fig)
                paths.append(p)
        return paths


def _provenance_record(**extra: Any) -> dict[str, Any]:
    from interptool._provenance import provenance

    return provenance(**extra)


def compare_similarity(
    teacher_cache: Any,
    *student_caches: Any,
    temperature: float | Sequence[float] = 1.0,
    k: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
    hierarchy: str | os.PathLike | np.ndarray | None = None,
    matrix: str = "softmax",
    ci: float = 0.95,
    device: str = "cpu",
    class_names: str | os.PathLike | Sequence[str] | None = None,
    names: Sequence[str] | None = None,
) -> TransferResult:
    """How closely each student's class similarity matches the teacher's, with paired
    bootstrap confidence intervals.

    All caches must hold the same images in the same order (same N, ids, data fingerprint and
    labels) and the same label space. For each temperature the metrics compare the teacher's
    and each student's ``matrix`` ("softmax" S or "dark_knowledge" S_dk):

    * ``pearson`` / ``spearman`` over the off-diagonal entries of the non-empty classes' rows;
    * ``kl``: mean over classes of KL(S_t[i] || S_s[i]) in nats (q clipped at 1e-12);
    * ``js_distance``: mean over classes of the Jensen-Shannon distance, sqrt of the JS
      divergence in bits (0 = identical rows, 1 = disjoint);
    * ``topk_overlap``: mean over classes of |teacher's k nearest classes ∩ student's| / k;
    * ``entropy`` / ``entropy_norm`` / ``nontarget_entropy`` per model (also the teacher);
    * ``hierarchy_spearman`` per model, when ``hierarchy`` is given: Spearman between the
      symmetrised S and the Wu-Palmer-like semantic similarity of the class hierarchy;

    and, temperature-free, ``accuracy`` per model and ``top1_agreement`` (fraction of images
    where student and teacher predict the same class). With two or more students every
    student metric also gets "A - B" differences for each pair.

    Bootstrap: ``n_boot`` resamples of the images with replacement (seeded; the same resampled
    images for every model, so differences are paired), bias-corrected percentile ``ci``
    intervals. A
    resample only re-weights per-image contributions, so it costs one (B, n_i) @ (n_i, K)
    matmul per class, not a recomputation: about N * K * n_boot multiply-adds per model and
    temperature (10k x 100, 1000 resamples: a few seconds; see docs/similarity.md for 50k x
    1000). ``n_boot=0`` skips the intervals.

    ``hierarchy``: a JSON / CSV / TSV file of class -> ancestor chain (see
    :mod:`interptool.analyzers.similarity._hierarchy`) or a ready (K, K) similarity array.

    ``class_names``: K names (list, or a classes.txt / JSON file) for tables, figures and
    hierarchy matching; default: the caches' ``class_names`` attribute, else "0" .. "K-1".

    ``names``: the models' names (teacher first) used in every table and figure; default: each
    cache's ``name`` attribute or file stem, made unique.
    """
    from interptool.analyzers.similarity._hierarchy import read_hierarchy, semantic_similarity

    if not student_caches:
        raise AnalysisError("compare_similarity needs a teacher cache and at least one student cache")
    if matrix not in MATRIX_KINDS:
        raise AnalysisError(f"matrix must be one of {MATRIX_KINDS}, got {matrix!r}")
    if not 0 < ci < 1:
        raise AnalysisError(f"ci must be in (0, 1), e.g. 0.95; got {ci!r}")
    if int(n_boot) < 0:
        raise AnalysisError(f"n_boot must be >= 0 (0 skips the CIs), got {n_boot!r}")
    temps = as_temperatures(temperature)
    data = [_read(c) for c in (teacher_cache, *student_caches)]
    kk = _check_one(data[0])
    for d in data[1:]:
        _check_one(d)
        _check_same_data(data[0], d)
    if not 1 <= int(k) <= kk - 1:
        raise AnalysisError(f"k (nearest classes) must be between 1 and K - 1 = {kk - 1}, got {k}")
    k = int(k)
    if names is None:
        names = _unique_names(data)
    else:
        names = [str(nm) for nm in names]
        if len(names) != len(data) or len(set(names)) != len(names):
            raise AnalysisError(
                f"names={names!r}: expected {len(data)} distinct model names (teacher first, "
                "then each student), one per cache")
    for d, nm in zip(data, names):
        d.name = nm
    class_names = (_class_names(data[0], kk) if class_names is None
                   else load_class_names(class_names, kk))
    sem = None
    hier_src = None
    if hierarchy is not None:
        if isinstance(hierarchy, np.ndarray):
            sem = np.asarray(hierarchy, dtype=np.float64)
            hier_src = "<array>"
            if sem.shape != (kk, kk):
                raise AnalysisError(f"hierarchy array has shape {sem.shape}, expected ({kk}, {kk})")
        else:
            hier_src = str(hierarchy)
            sem = semantic_similarity(read_hierarchy(hierarchy), class_names, hier_src)

    teacher, students = names[0], names[1:]
    labels = data[0].labels
    n = labels.shape[0]
    sl = SortedLabels.build(labels, kk)
    labelled = (labels >= 0).astype(np.float64)
    preds = [d.logits.argmax(1) for d in data]
    correct = [((p == labels) & (labels >= 0)).astype(np.float64) for p in preds]
    agree = [(p == preds[0]).astype(np.float64) for p in preds[1:]]
    # one softmax pass per model and temperature: it gives the point estimate's exact float64
    # class sums and each model's SimilarityResult, and (kept when they fit) the per-sample
    # statistics the bootstrap's weighted sums reuse
    use_kernels = kernels_pay_off(kk)
    stacked = [StackedSamples([d.logits for d in data], sl, t, matrix,
                              bootstrap_dtype(kk) if use_kernels else np.dtype(np.float64),
                              device, keep=bool(n_boot)) for t in temps]
    point_sums = {t: st.point_sums() for t, st in zip(temps, stacked)}
    log_k, log_k1 = np.log(kk), np.log(kk - 1) if kk > 2 else np.nan

    def evaluate(W: np.ndarray) -> dict[tuple[str, float | None, str], np.ndarray]:
        """The point estimate (``W`` one row of ones: the unweighted class sums above)."""
        counts = weighted_counts(W, sl)
        valid = counts > 0
        out: dict[tuple[str, float | None, str], np.ndarray] = {}
        with np.errstate(invalid="ignore", divide="ignore"):
            lab_w = W @ labelled
            for m, c in zip(names, correct):
                out[(m, None, "accuracy")] = W @ c / lab_w
            for m, a in zip(students, agree):
                out[(m, None, "top1_agreement")] = W @ a / W.sum(1)
        for t in temps:
            mats = []
            for mi, m in enumerate(names):
                cs = np.nan_to_num(point_sums[t][mi])[None]  # empty classes: 0 (masked below)
                sums = cs[:, :, kk:2 * kk] if matrix == "dark_knowledge" else cs[:, :, :kk]
                hs, hqs = cs[:, :, 2 * kk], cs[:, :, 2 * kk + 1]
                S = normalise_rows(sums, counts)
                mats.append(S)
                with np.errstate(invalid="ignore", divide="ignore"):
                    ent = np.where(valid, hs / counts, 0.0).sum(1) / valid.sum(1)
                    nte = np.where(valid, hqs / counts, 0.0).sum(1) / valid.sum(1)
                out[(m, t, "entropy")] = ent
                out[(m, t, "entropy_norm")] = ent / log_k
                out[(m, t, "nontarget_entropy")] = nte
                out[(m, t, "nontarget_entropy_norm")] = nte / log_k1
                if sem is not None:
                    out[(m, t, "hierarchy_spearman")] = semantic_spearman(S, valid, sem)
            ref = Reference(mats[0], valid, k)  # teacher's ranks etc., shared by students
            for m, S in zip(students, mats[1:]):
                for metric, v in ref.compare(S).items():
                    out[(m, t, metric)] = v
        return out

    point = {key: float(v[0]) for key, v in evaluate(np.ones((1, n))).items()}
    similarity = {nm: _similarity_of(d, temps, kk, device,
                                     {t: point_sums[t][mi] for t in temps})
                  for mi, (nm, d) in enumerate(zip(names, data))}

    n_boot = int(n_boot)
    boots: dict[tuple[str, float | None, str], list[np.ndarray]] = {key: [] for key in point}
    if n_boot:
        rng = np.random.default_rng(seed)
        replicates = BootstrapEvaluator(
            [d.logits for d in data], names, sl, labelled, correct, agree, temps, matrix, k,
            [[similarity[nm].dark_knowledge[t] if matrix == "dark_knowledge"
              else similarity[nm].matrices[t] for nm in names] for t in temps],
            sem, device, n_boot, use_kernels=use_kernels, stacked=stacked)
        with progress(total=n_boot, desc="bootstrap", unit="resample") as bar:
            done = 0
            while done < n_boot:
                b = min(replicates.block, n_boot - done)
                res = replicates(bootstrap_weights(rng, n, b))
                for key, v in res.items():
                    boots[key].append(v)
                done += b
                bar.update(b)
    samples = {key: (np.concatenate(v) if v else np.empty(0)) for key, v in boots.items()}

    # student-minus-student differences, paired (same resamples)
    for a, b_ in combinations(students, 2):
        for (m, t, metric) in list(point):
            if m != a or (b_, t, metric) not in point:
                continue
            key = (f"{a} - {b_}", t, metric)
            point[key] = point[(a, t, metric)] - point[(b_, t, metric)]
            samples[key] = samples[(a, t, metric)] - samples[(b_, t, metric)]

    rows = []
    for key, value in point.items():
        m, t, metric = key
        s = samples[key]
        s = s[np.isfinite(s)]
        iv = interval_from_resamples(s, value, level=ci, method="bc")
        lo, hi, bias = iv.low, iv.high, iv.bias
        role = "teacher" if m == teacher else "student" if m in students else "difference"
        if role == "difference" or metric in PAIR_METRICS or metric == "top1_agreement":
            ref = teacher if role == "student" else m.split(" - ")[1] if role == "difference" else ""
        else:
            ref = ""
        rows.append({
            "model": m, "role": role, "reference": ref,
            "temperature": np.nan if t is None else t, "metric": metric,
            "value": value, "ci_low": float(lo), "ci_high": float(hi), "bias": bias,
            "ci_widened": bool(iv.widened), "n_boot": int(s.size),
        })
    est = pd.DataFrame(rows)
    role_order = {"teacher": 0, "student": 1, "difference": 2}
    est = est.assign(_r=est["role"].map(role_order)).sort_values(
        ["_r", "temperature", "model", "metric"], kind="stable", na_position="first"
    ).drop(columns="_r").reset_index(drop=True)

    for nm, res in similarity.items():
        res.class_names = class_names
        res.name = nm
    inputs = [{
        "name": nm, "role": "teacher" if i == 0 else "student", "path": d.path,
        "data_fingerprint": d.data_fingerprint, "checkpoint_sha256": d.checkpoint_sha256,
        "model": d.model_info, "n": int(n), "num_classes": kk,
    } for i, (nm, d) in enumerate(zip(names, data))]
    return TransferResult(
        teacher=teacher, students=students, temperatures=temps, k=k, matrix=matrix,
        n_boot=n_boot, seed=int(seed), ci=float(ci), estimates=est, similarity=similarity,
        bootstrap={f"{m}|{'' if t is None else fmt_t(t)}|{metric}": v
                   for (m, t, metric), v in samples.items()},
        semantic=sem, inputs=inputs, hierarchy=hier_src,
        provenance=_provenance_record(inputs=inputs),
    )


def bias_corrected_interval(samples: np.ndarray, estimate: float, ci: float = 0.95) -> tuple[float, float]:
    """Efron's bias-corrected (BC) percentile interval from bootstrap ``samples``, always
    containing ``estimate``.

    Distances between matrices estimated from finite samples (KL, JS) are biased upwards under
    resampling, so a plain percentile interval can sit entirely on one side of the estimate.
    BC shifts the percentiles by ``z0 = Phi^-1(P(sample < estimate))`` (ties count half); with
    a symmetric, unbiased bootstrap distribution (z0 = 0) it equals the percentile interval.
    When the bias is so large that even the BC interval misses the estimate (fewer than 2.5%
    of the replicates on one side of it), its nearer bound is moved to the estimate
    (:func:`interptool.common.stats.interval_from_resamples`, which also reports the bias and
    whether it widened). Returns ``(nan, nan)`` when there are no finite samples.
    """
    iv = interval_from_resamples(samples, estimate, level=ci, method="bc")
    return float(iv.low), float(iv.high)
