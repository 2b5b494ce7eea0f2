"""``run_compare``: caches, every analyzer on every model, findings, summary.json, report.html.

The stages (:mod:`interptool.pipeline._stages`) run in order; each analysis stage stores its
payload as a resumable marker (:mod:`interptool.pipeline._stage_cache`), so an interrupted
run redoes only unfinished work. Rendering is :mod:`interptool.report`'s job.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from interptool._progress import say
from interptool._provenance import (
    atomic_write_text,
    now_iso,
    output_lock,
    seed_everything,
    versions,
)
from interptool.cache import rank_info
from interptool.common.jsonsafe import to_jsonable
from interptool.errors import CacheError
from interptool.pipeline import _stages
from interptool.pipeline._config import CompareConfig
from interptool.pipeline._context import RunContext
from interptool.pipeline.findings import build_findings

__all__ = ["FORMAT", "run_compare"]

FORMAT = "interptool-summary/1"


def _execute(run: RunContext, config_text: str | None, command: str | None,
             title: str | None) -> Path:
    cfg = run.cfg
    t_all = time.perf_counter()
    run.out.mkdir(parents=True, exist_ok=True)
    _cache_stages(run)
    summary: dict[str, Any] = {
        "format": FORMAT,
        "title": title or f"interptool comparison: {cfg.teacher.name} and "
        f"{len(cfg.students)} student(s)",
        "teacher": cfg.teacher.name,
        "students": [m.name for m in cfg.students],
        "n_eval": len(run.eval_ds) if run.eval_ds is not None else None,
        "n_probe": len(run.probe_ds) if run.probe_ds is not None else None,
    }
    summary["models"] = run.timed("models", lambda: _stages.models_table(run))
    an = cfg.analysis
    if an.dissection is not None:
        summary["dissection"] = run.timed("dissection", lambda: _stages.dissection(run))
    if an.similarity is not None and cfg.students:
        summary["similarity"] = run.timed("similarity", lambda: _stages.similarity(run))
    if an.attribution is not None:
        summary["attribution"] = run.timed("attribution", lambda: _stages.attribution(run))
    for name in an.enabled():  # every other registered analysis: its generic stage
        if name not in _stages.BUILTIN_STAGES:
            summary[name] = run.timed(name, lambda name=name: _stages.generic_stage(run, name))
    summary["findings"] = build_findings(summary, cfg, run.eval_cache)
    from interptool.pipeline._verdicts import paper_directions

    summary["paper_direction"] = paper_directions(summary["findings"])
    for d in summary["paper_direction"]:
        say(d["sentence"])
    from interptool.pipeline._mechanism import mechanism_section

    mech = mechanism_section(summary, run.figures)
    if mech is not None:
        summary["mechanism"] = mech
    run.timings["total"] = round(time.perf_counter() - t_all, 2)
    summary["figures"] = run.figures.entries
    summary["provenance"] = {
        "created": now_iso(),
        "versions": versions(),
        "run": {**asdict(cfg.run), "device": run.device},
        "timings": run.timings,
        "reused_stages": list(run.stages.reused),
        "data": {k: v for k, v in (
            # the opened set's own spec: canonical, e.g. concept-world's version written out
            ("eval", getattr(run.eval_ds, "spec", None) or cfg.data.eval),
            ("eval fingerprint", getattr(run.eval_ds, "fingerprint", None)),
            ("probe", getattr(run.probe_ds, "spec", None) or cfg.data.probe),
            ("probe fingerprint", getattr(run.probe_ds, "fingerprint", None))) if v},
        "command": command or "run_compare()",
        "config_file": cfg.source,
    }
    summary["config"] = cfg.to_dict()
    summary["config_text"] = config_text
    summary = to_jsonable(summary)
    atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1))
    from interptool.report import render_html

    path = run.out / "report.html"
    render_html(summary, path)
    say(f"report written in {run.timings['total']:.0f}s: {path}")
    return path


def run_compare(
    config: CompareConfig,
    out: str | Path,
    *,
    config_text: str | None = None,
    command: str | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Run every configured analysis on every model and write the report; returns its path.

    ``DIR/report.html`` (self-contained), ``DIR/summary.json`` (every number of the report),
    and behind them ``DIR/cache/``, ``DIR/dissection/<model>/<layer>/``, ``DIR/similarity/``,
    ``DIR/attribution/<method>/``. Re-running with the same config resumes: complete caches
    and finished stages are reused (``DIR/.stages/<stage>.json``). A cache made with other
    settings is kept and a new one written beside it, unless ``overwrite`` (the user's
    ``--overwrite``) replaces it; any other cache fault stops the run and keeps the partial
    cache for the next run to resume (:mod:`interptool.pipeline._caches`).

    The whole run holds interptool's lock on ``DIR`` (``DIR.lock`` beside it): a second run
    writing the same ``DIR`` stops at once with :class:`interptool._locks.OutputLockedError`
    (exit 2 on the command line), before it looks at, resumes or replaces anything there.
    """
    out = Path(out)
    rank, world = rank_info()[:2]
    if world > 1 and rank != 0:
        # Under torchrun every rank takes its shard of each cache (the cache stage is
        # collective: rank 0 decides hit/build/variant and joins the shards); the analyses
        # read the joined files and run on rank 0 alone, which holds the lock on DIR.
        _cache_stages(RunContext(config, out, overwrite=overwrite))
        return out / "report.html"
    with output_lock(out.resolve(), fix="choose another --out"):
        try:
            return _execute(RunContext(config, out, overwrite=overwrite), config_text, command,
                            title)
        except CacheError as exc:
            _own_cache_fix(exc, out)
            raise


def _own_cache_fix(exc: CacheError, out: Path) -> None:
    """A damaged cache under ``OUT/cache`` is compare's own: the fix is compare's
    ``--overwrite`` (which rebuilds it), not the ``interptool cache`` command the reader's
    message suggests for a cache made by hand; the message is mended in place."""
    text = str(exc)
    if str(out / "cache") in text and "`interptool cache ... --overwrite`" in text:
        exc.args = (text.replace("`interptool cache ... --overwrite`",
                                 "`interptool compare CONFIG --out DIR --overwrite` (it "
                                 "rebuilds compare's caches)"), *exc.args[1:])


def _cache_stages(run: RunContext) -> None:
    """Load the models and build every cache of the run (logits, layers, random-init controls).

    The same calls in the same order on every torchrun rank, so the ranks meet in each
    collective cache build.
    """
    (run.out / "cache").mkdir(parents=True, exist_ok=True)
    seed_everything(run.cfg.run.seed)
    run.timed("load", lambda: _stages.load_models(run))
    run.timed("cache", lambda: _stages.build_caches(run))
    if run.cfg.analysis.dissection is not None:
        from interptool.pipeline._dissect import cache_baselines

        run.timed("baseline", lambda: cache_baselines(run))
