"""One scoring path for attribution maps of several models, shared by ``interptool attribute``
and the ``compare`` pipeline: agreement with the teacher's maps, localisation in object
masks, and faithfulness by deletion and insertion, on the same images for every model.

Inputs and masks are read ``chunk`` images at a time, sized from a byte budget
(:data:`~interptool.analyzers.attribution._scores.WORK_BYTES`) rather than a count, so the
peak memory is the same at any N; the summaries (bootstrap intervals over images) cover all
images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from interptool._resources import thread_scope
from interptool.analyzers.attribution._scores import (
    FaithfulnessResult,
    agreement,
    block_rows,
    class_object_masks,
    faithfulness,
    folder_masks,
    localisation,
)
from interptool.errors import AnalysisError

__all__ = ["ObjectMasks", "display_images", "faithfulness_batch", "sample_record",
           "sample_rows", "score_maps"]


def display_images(images: Any) -> np.ndarray:
    """(N, H, W, C) float images in [0, 1] for figures, from model inputs (N, C, H, W)."""
    from interptool.analyzers.attribution._analyzer import _display

    return _display(images)

# Bytes per input pixel of one image held while its chunk is scored: the model inputs
# (3 float32 channels, twice: the tensor and the images it was stacked from) and the chunk's
# float32 maps. A chunk of 256 images (the count used before) of 224 px inputs was 150 MiB
# at any N >= 256, and less below: memory grew with N.
_CHUNK_BYTES = 2 * 3 * 4 + 4

#: the object masks of a set are kept (bit-packed: 1/8 byte per pixel) up to this many
#: bytes, so that scoring several models reads each mask once; larger sets are read anew
#: chunk by chunk. Was 64 MiB of unpacked booleans, read all at once.
MASK_CACHE_BYTES = 8 * 2**20


def faithfulness_batch(internal_batch_size: int | None, batch_size: int) -> int:
    """Rows per model call of the faithfulness curves: the internal batch when set, else
    derived from the run's batch size as ``max(batch_size, 32)`` (a deletion/insertion row
    is a no-grad forward pass, far cheaper than an attribution row). The one rule of
    ``interptool attribute`` (``--batch-size``) and ``compare`` (``[run] batch_size``)."""
    return int(internal_batch_size or max(int(batch_size), 32))


def chunk_rows(size: tuple[int, int]) -> int:
    """Images per chunk of faithfulness inputs and maps at map ``size`` (H, W): as many as
    :data:`~interptool.analyzers.attribution._scores.WORK_BYTES` allows, whatever N."""
    return block_rows(int(size[0]) * int(size[1]), _CHUNK_BYTES)


class ObjectMasks:
    """Object masks of the images at data-set ``rows`` at one map size, as a lazy sliceable
    (len(rows), H, W) bool array (position ``i`` is row ``rows[i]``; an int ``rows`` means
    rows 0..rows-1): the data set's own (Broden / concept-world class objects) or a folder
    of masks given by the user. Sets up to :data:`MASK_CACHE_BYTES` of bit-packed masks are
    read once (chunk by chunk) and kept packed; larger ones are read on each access."""

    def __init__(self, dataset: Any, size: tuple[int, int], rows: int | Sequence[int],
                 folder: str | Path | None = None) -> None:
        self.dataset, self.folder, self.size = dataset, folder, tuple(size)
        self.rows = (np.arange(int(rows), dtype=np.int64) if isinstance(rows, (int, np.integer))
                     else np.asarray(rows, dtype=np.int64).reshape(-1))
        self.shape = (int(self.rows.size), *self.size)
        self._packed: np.ndarray | None = None

    def _read(self, rows: Sequence[int]) -> np.ndarray:
        rows = [int(r) for r in rows]
        if self.folder:
            return folder_masks(self.folder, self.dataset, rows, size=self.size)
        return class_object_masks(self.dataset, rows, size=self.size)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        n, pixels = self.shape[0], self.size[0] * self.size[1]
        if n * -(-pixels // 8) > MASK_CACHE_BYTES:
            return self._read(self.rows[key])
        if self._packed is None:
            # read in chunks and packed at once: the unpacked masks of the whole set are
            # never in memory together
            step = block_rows(pixels, 2)
            self._packed = np.concatenate(
                [np.packbits(self._read(self.rows[s:s + step]).reshape(-1, pixels), axis=1)
                 for s in range(0, n, step)]) if n else np.zeros((0, -(-pixels // 8)),
                                                                np.uint8)
        part = self._packed[key]
        one = part.ndim == 1  # an int key: one mask
        part = part.reshape(-1, part.shape[-1])
        out = np.unpackbits(part, axis=1, count=pixels).view(bool).reshape(
            len(part), *self.size)
        return out[0] if one else out


def sample_rows(results: Mapping[str, Any], teacher: str) -> np.ndarray:
    """The data-set rows the maps of ``results`` were computed on (``result.indices``; rows
    0..n-1 for a result without them), checked to be the same for every model: scores pair
    images across models, so a model attributed on other images is refused."""
    def rows_of(res: Any) -> np.ndarray:
        idx = getattr(res, "indices", None)
        return (np.arange(res.n, dtype=np.int64) if idx is None
                else np.asarray(idx, dtype=np.int64).reshape(-1))

    rows = rows_of(results[teacher])
    for name, res in results.items():
        if not np.array_equal(rows_of(res), rows):
            raise AnalysisError(
                f"attribution of {name!r} covers other images than {teacher!r}'s "
                f"({len(rows_of(res))} vs {len(rows)} rows, or another sample); expected the "
                "same data-set rows for every model: run every model with the same n, sample "
                "and seed")
    return rows


def sample_record(res: Any, rows: np.ndarray) -> dict[str, Any]:
    """How the scored images were chosen (``res.params["sample"]``: method, seed, n, of)
    with their data-set ``ids`` and ``rows``, for scores.json and summary.json."""
    rec = dict(res.params.get("sample") or {"method": "first", "seed": None,
                                             "n": int(res.n), "of": None})
    rec["ids"] = [str(i) for i in res.ids]
    rec["rows"] = [int(r) for r in rows]
    return rec


def _faithfulness(model: Any, inputs: Callable[[np.ndarray], Any], rows: np.ndarray,
                  res: Any, mode: str, *, patch: int, steps: int, baseline: str,
                  batch_size: int, device: str, seed: int,
                  chunk: int | None) -> FaithfulnessResult:
    if chunk is None:
        chunk = chunk_rows(tuple(res.maps.shape[1:]))
    parts = []
    for s in range(0, res.n, chunk):
        e = min(res.n, s + chunk)
        # start=s: each image keeps its row of the seeded random orders, so the numbers do
        # not depend on the chunk size (which depends on the image size)
        parts.append(faithfulness(
            model, inputs(rows[s:e]), res.maps[s:e], res.targets[s:e], mode=mode, patch=patch,
            steps=steps, baseline=baseline, batch_size=batch_size, device=device,
            ids=res.ids[s:e], seed=seed, n_boot=0, reuse_reference=True, start=s))
    return FaithfulnessResult.concat(parts, seed=seed)


def score_maps(
    results: Mapping[str, Any],
    *,
    teacher: str,
    models: Mapping[str, Any] | None = None,
    inputs: Callable[[str, np.ndarray], Any] | None = None,
    masks: Callable[[tuple[int, int], np.ndarray], Any] | None = None,
    modes: Sequence[str] = ("deletion", "insertion"),
    patch: int = 8,
    steps: int = 16,
    baseline: str = "blur",
    batch_size: int = 64,
    device: str = "cpu",
    seed: int = 0,
    label: str | None = None,
    out: str | Path | None = None,
    chunk: int | None = None,
    threads: int | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Score one method's maps of every model (``results``: name -> AttributionResult, the
    teacher among them, all on the same images: the data-set rows ``result.indices``, e.g. a
    stratified sample; checked by :func:`sample_rows`).

    ``models`` (name -> nn.Module) and ``inputs(name, rows)`` (that model's input tensor for
    the data-set ``rows``, an int array) enable faithfulness in ``modes``;
    ``masks(size, rows)`` (an (len(rows), H, W) bool array or an :class:`ObjectMasks` of
    those rows) enables localisation. Inputs and masks are always read at the rows the maps
    were computed on, never at positions 0..n-1. ``label`` is added
    to the agreement's model names (e.g. the method). With ``out`` each score result is also
    saved under ``out/<kind>_<model>[_<mode>]/``.

    Returns ``{"sample": dict, "agreement": {student: dict}, "localisation": {model: dict},
    "faithfulness": {model: {mode: dict}}, "per_image": {measure: {model: values}}}`` where
    ``sample`` is :func:`sample_record` (method, seed, data-set ids and rows scored) and
    the per-image measures are ``agreement_spearman``, ``localisation_energy`` and
    ``<mode>_auc`` (and ``<mode>_normalised`` when the result has it), for paired findings.

    ``threads``: torch threads of the faithfulness passes, as in :meth:`Attribution.run`
    (``None``: the enclosing scope's choice, else only the cores idle now; one choice for
    the whole call, so the random-order reference memo stays valid across models).
    ``figures=False``: the saved score results get no ``.png`` (their CSV and JSON only).
    ``chunk``: images whose inputs are held at once for the faithfulness curves (``None``:
    :func:`chunk_rows` of the map size, so that memory does not grow with N; the numbers
    do not depend on it).
    """
    from interptool.analyzers.attribution._params import ScoringParams

    # checked before anything is scored (steps < 0 used to skip faithfulness silently)
    ScoringParams(patch=patch, faithfulness_steps=steps, faithfulness_baseline=baseline)
    # many small forward passes: threads on busy cores cost more than they bring
    with thread_scope(threads):
        return _score_maps(results, teacher=teacher, models=models, inputs=inputs,
                           masks=masks, modes=modes, patch=patch, steps=steps,
                           baseline=baseline, batch_size=batch_size, device=device, seed=seed,
                           label=label, out=out, chunk=chunk, figures=figures)


def _score_maps(results: Mapping[str, Any], *, teacher: str, models: Mapping[str, Any] | None,
                inputs: Callable[[str, np.ndarray], Any] | None,
                masks: Callable[[tuple[int, int], np.ndarray], Any] | None,
                modes: Sequence[str], patch: int, steps: int, baseline: str, batch_size: int,
                device: str, seed: int, label: str | None, out: str | Path | None,
                figures: bool = True,
                chunk: int | None) -> dict[str, Any]:
    """:func:`score_maps` inside its thread scope."""
    base = Path(out) if out is not None else None
    rows = sample_rows(results, teacher)
    scores: dict[str, Any] = {"sample": sample_record(results[teacher], rows),
                              "agreement": {}, "localisation": {}, "faithfulness": {},
                              "per_image": {}}
    per = scores["per_image"]

    def keep(res: Any, folder: str) -> None:
        if base is not None:
            res.save(base / folder, figures=figures)

    for name, res in results.items():
        if name == teacher:
            continue
        ag = agreement(results[teacher], res, seed=seed)
        if label:
            ag.names = (f"{teacher}:{label}", f"{name}:{label}")
        keep(ag, f"agreement_{name}")
        scores["agreement"][name] = ag.to_dict()
        per.setdefault("agreement_spearman", {})[name] = ag.spearman
    for name, res in results.items():
        if masks is not None:
            size = tuple(int(v) for v in res.maps.shape[1:])
            loc = localisation(res, masks(size, rows), seed=seed)
            keep(loc, f"localisation_{name}")
            scores["localisation"][name] = loc.to_dict()
            per.setdefault("localisation_energy", {})[name] = loc.energy
        if models is not None and inputs is not None and modes and steps > 0:
            scores["faithfulness"][name] = {}
            for mode in modes:
                f = _faithfulness(models[name], lambda r, name=name: inputs(name, r),
                                  rows, res, mode, patch=patch, steps=steps, baseline=baseline,
                                  batch_size=batch_size, device=device, seed=seed,
                                  chunk=chunk)
                keep(f, f"faithfulness_{name}_{mode}")
                scores["faithfulness"][name][mode] = f.to_dict()
                per.setdefault(f"{mode}_auc", {})[name] = f.auc
                if f.normalised is not None:
                    per.setdefault(f"{mode}_normalised", {})[name] = f.normalised
    return scores
