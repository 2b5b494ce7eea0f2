"""Measure the reproduction study with interptool and write the tables of docs/reproduction.md.

For every trained run in ``--runs`` (``train.py``'s ``<run>.json`` + ``.safetensors``):

1. ``cache_activations`` on the concept-world v2 eval split (logits) and probe split
   (``layer3``, ``layer4``), 48 px, no crop;
2. ``Dissection()`` (NetDissect-Lite protocol: object, part, scene, texture, color; quantile
   0.005; detector = best IoU >= 0.04) on ``layer3`` and ``layer4``;
3. ``ClassSimilarity`` (within-class entropy of the softmax, T = 1 and 4) and
   ``compare_similarity(teacher, *students)`` (how well each student's class-similarity
   matrix matches the teacher's: Pearson of the off-diagonal entries, KL; and
   ``hierarchy_spearman`` against the documented concept overlap of the classes,
   ``class_similarity_v2()``);
4. per recipe (three seeds): mean and 95 % t-interval over seeds (``scipy.stats.t``), and
   paired per-seed differences KD - scratch, LS - scratch (the recipes of one seed share the
   student's initialisation and batch order).

Writes ``<out>/per_model.csv``, ``<out>/per_recipe.csv``, ``<out>/paired.csv``,
``<out>/categories.csv``, ``<out>/results.json`` and ``<out>/tables.md``, then the figures
``docs/img/reproduction_{detectors,temperature,mechanism}.png`` from those CSVs
(``--figures-only`` redraws just the figures).

    python examples/kd_reproduction/analyze.py --runs examples/kd_reproduction/runs \\
        --out examples/kd_reproduction/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
LAYERS = ("layer3", "layer4")
PROBE_N = 1000
IOU = 0.04
RECIPE_ORDER = ["scratch", "ls", "kd-T4", "kd-T1", "kd-T2", "kd-T8", "untrained"]
UNTRAINED_SEEDS = (0, 1, 2)


def group_of(name: str) -> str:
    """``kd-T4-s1`` -> ``kd-T4``; ``scratch-s0`` -> ``scratch``; ``teacher`` -> ``teacher``."""
    return name.rsplit("-s", 1)[0] if name != "teacher" else name


def t_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and t-interval over seeds (NaN bounds with fewer than two values)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    m = float(v.mean())
    if len(v) < 2:
        return m, float("nan"), float("nan")
    sem = float(v.std(ddof=1) / np.sqrt(len(v)))
    if sem == 0:
        return m, m, m
    lo, hi = stats.t.interval(level, len(v) - 1, loc=m, scale=sem)
    return m, float(lo), float(hi)


def measure(runs: Path, out: Path, threads: int = 1) -> pd.DataFrame:
    """Cache, dissect and score every finished run; one row per model."""
    import torch

    from interptool.analyzers import ClassSimilarity, Dissection
    from interptool.cache import cache_activations
    from interptool.data import open_dataset
    from interptool.loading import load_model

    torch.set_num_threads(threads)
    import sys

    sys.path.insert(0, str(HERE))
    from train import DATA, spec

    entries = {p.stem: json.loads(p.read_text()) for p in sorted(runs.glob("*.json"))
               if p.stem != "manifest"}
    entries.update(untrained_students(out / "untrained"))
    eval_spec, probe_spec = spec("eval", DATA["n_eval"]), spec("probe", PROBE_N)
    eval_ds, probe_ds = open_dataset(eval_spec), open_dataset(probe_spec)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    (out / "dissection").mkdir(parents=True, exist_ok=True)
    rows, cat_rows = [], []
    for name, e in entries.items():
        done = out / "models" / f"{name}.json"
        if done.is_file():
            # measured before, on the same weights: reuse (re-running adds new runs only)
            prev = json.loads(done.read_text())
            if prev["row"]["sha256"] == e.get("sha256"):
                rows.append(prev["row"])
                cat_rows += prev["categories"]
                continue
        lm = load_model(e["arch"], runs / e["file"])
        ev = cache_activations(lm, eval_ds, [], out / "cache" / f"{name}_eval.h5",
                               threads=threads, batch_size=250)
        pr = cache_activations(lm, probe_ds, list(LAYERS), out / "cache" / f"{name}_probe.h5",
                               threads=threads, batch_size=250)
        sim = ClassSimilarity(temperature=[1.0, 4.0]).run(ev)
        row: dict[str, Any] = {
            "model": name, "group": group_of(name), "recipe": e["recipe"], "T": e["T"],
            "seed": e["seed"], "sha256": e.get("sha256"), "eval_accuracy": float(sim.accuracy),
            "manifest_eval_accuracy": e["eval_accuracy"],
            "entropy_T1": float(sim.entropy_overall[1.0]),
            "entropy_T4": float(sim.entropy_overall[4.0]),
        }
        for layer in LAYERS:
            res = Dissection(iou_threshold=IOU).run(pr, layer, probe_ds)
            res.to_frame().to_csv(out / "dissection" / f"{name}_{layer}.csv", index=False)
            det = res.detectors()
            row[f"{layer}_units"] = int(res.units)
            row[f"{layer}_detectors"] = int(len(det))
            row[f"{layer}_fraction"] = float(res.detector_fraction())
            row[f"{layer}_unique"] = int(res.unique_concepts())
            # the paper's fork counts at IoU >= 0.05
            row[f"{layer}_detectors_iou05"] = int(len(res.detectors(0.05)))
            row[f"{layer}_mean_best_iou"] = float(np.mean(res.best_iou))
            for cat, c in res.counts_by_category().items():
                cat_rows.append({"model": name, "group": group_of(name), "layer": layer,
                                 "category": cat, "detectors": c["detectors"],
                                 "unique": c["unique"]})
        rows.append(row)
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps({"row": row, "categories": [
            c for c in cat_rows if c["model"] == name]}, indent=1, default=float) + "\n")
        print(f"{name}: acc {row['eval_accuracy']:.3f}, layer3 {row['layer3_detectors']}, "
              f"layer4 {row['layer4_detectors']}", flush=True)
    per_model = pd.DataFrame(rows)
    pd.DataFrame(cat_rows).to_csv(out / "categories.csv", index=False)
    return per_model


def probe_bootstrap(out: Path, seed: int = 0, resamples: int = 200) -> pd.DataFrame:
    """Intervals over probe images for one seed: paired bootstrap of KD - scratch and
    LS - scratch detector measures (the same resampled probe images for both models)."""
    import sys

    sys.path.insert(0, str(HERE))
    from train import spec

    from interptool.analyzers import Dissection
    from interptool.data import open_dataset

    probe = open_dataset(spec("probe", PROBE_N))
    rows = []
    for layer in LAYERS:
        res = {}
        for g in ("scratch", "ls", "kd-T4"):
            path = out / "cache" / f"{g}-s{seed}_probe.h5"
            res[g] = Dissection(iou_threshold=IOU, bootstrap=resamples, seed=0).run(
                path, layer, probe)
        for a, b in (("kd-T4", "scratch"), ("ls", "scratch")):
            t = res[a].paired_difference(res[b])
            t.insert(0, "layer", layer)
            t.insert(0, "comparison", f"{a}-s{seed} - {b}-s{seed}")
            rows.append(t)
    table = pd.concat(rows, ignore_index=True)
    table.to_csv(out / f"probe_bootstrap_s{seed}.csv", index=False)
    return table


def untrained_students(folder: Path) -> dict[str, Any]:
    """Control: the student at its random initialisation (the init of seed s of train.py),
    so the counts of trained students can be read against what an untrained net scores."""
    import torch
    from safetensors.torch import save_file

    from interptool._provenance import sha256_file
    from interptool.loading._zoo import cw2_resnet18

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for s in UNTRAINED_SEEDS:
        name = f"untrained-s{s}"
        torch.manual_seed(100 + s)  # train.py's student init for seed s
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            save_file({k: v.contiguous() for k, v in cw2_resnet18(12).state_dict().items()},
                      str(path))
        out[name] = {"name": name, "file": str(path.resolve()), "recipe": "untrained",
                     "sha256": sha256_file(path),
                     "arch": "interptool:cw2-resnet18", "T": None, "seed": s,
                     "eval_accuracy": float("nan")}
    return out


def transfer(runs: Path, out: Path, per_model: pd.DataFrame) -> pd.DataFrame:
    """Similarity transfer of every student to the teacher, one row per (student, T)."""
    from interptool.analyzers import compare_similarity
    from interptool.data._concept_world import class_similarity_v2

    students = [m for m in per_model["model"] if m != "teacher"]
    # (untrained students are included: their transfer is the floor a recipe starts from)
    res = compare_similarity(out / "cache" / "teacher_eval.h5",
                             *[out / "cache" / f"{m}_eval.h5" for m in students],
                             temperature=[1.0, 4.0], n_boot=0,
                             hierarchy=class_similarity_v2())
    est = res.estimates
    est.to_csv(out / "transfer_raw.csv", index=False)
    return est


def summarise(per_model: pd.DataFrame, est: pd.DataFrame, out: Path) -> dict[str, Any]:
    """Per-recipe means / intervals, paired differences, category counts; tables.md."""
    pm = per_model.copy()
    # transfer metrics per model (T = 4, the KD temperature, and T = 1)
    for metric in ("pearson", "kl", "hierarchy_spearman"):
        for t in (1.0, 4.0):
            sel = est[(est["metric"] == metric) & (est["temperature"] == t)]
            if "role" in sel:
                sel = sel[sel["role"] != "difference"]
            vals = dict(zip(sel["model"], sel["value"]))
            pm[f"{metric}_T{int(t)}"] = [vals.get(m, np.nan) for m in pm["model"]]
    pm.to_csv(out / "per_model.csv", index=False)
    metrics = ["eval_accuracy", "layer3_detectors", "layer3_fraction", "layer4_detectors",
               "layer4_fraction", "layer3_detectors_iou05", "layer4_detectors_iou05", "layer3_unique", "layer4_unique", "entropy_T1", "entropy_T4",
               "pearson_T4", "kl_T4", "hierarchy_spearman_T1", "hierarchy_spearman_T4"]
    rec_rows = []
    for g in ["teacher", *RECIPE_ORDER]:
        sub = pm[pm["group"] == g]
        if sub.empty:
            continue
        for metric in metrics:
            m, lo, hi = t_interval(sub[metric].to_numpy())
            rec_rows.append({"group": g, "n_seeds": len(sub), "metric": metric, "mean": m,
                             "lo": lo, "hi": hi, "values": sub[metric].round(4).tolist()})
    per_recipe = pd.DataFrame(rec_rows)
    per_recipe.to_csv(out / "per_recipe.csv", index=False)
    # paired differences over seeds (same init and batches within a seed)
    pair_rows = []
    for a, b in (("kd-T4", "scratch"), ("ls", "scratch"), ("kd-T4", "ls")):
        A = pm[pm["group"] == a].set_index("seed")
        B = pm[pm["group"] == b].set_index("seed")
        seeds = sorted(set(A.index) & set(B.index))
        if not seeds:
            continue
        for metric in metrics:
            d = (A.loc[seeds, metric] - B.loc[seeds, metric]).to_numpy(dtype=float)
            m, lo, hi = t_interval(d)
            pair_rows.append({"comparison": f"{a} - {b}", "n_seeds": len(seeds),
                              "metric": metric, "mean": m, "lo": lo, "hi": hi,
                              "values": np.round(d, 4).tolist()})
    paired = pd.DataFrame(pair_rows)
    paired.to_csv(out / "paired.csv", index=False)
    summary = {"per_model": pm.to_dict(orient="records"),
               "per_recipe": per_recipe.to_dict(orient="records"),
               "paired": paired.to_dict(orient="records")}
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (out / "tables.md").write_text(tables_md(pm, per_recipe, paired, out))
    return summary


def _fmt(m: float, lo: float, hi: float, digits: int = 1, pct: bool = False) -> str:
    k = 100.0 if pct else 1.0
    if np.isnan(lo):
        return f"{m * k:.{digits}f}"
    return f"{m * k:.{digits}f} [{lo * k:.{digits}f}, {hi * k:.{digits}f}]"


def tables_md(pm: pd.DataFrame, per_recipe: pd.DataFrame, paired: pd.DataFrame,
              out: Path) -> str:
    """Markdown tables (mean [95 % t-interval over seeds])."""
    def cell(g: str, metric: str, digits: int = 1, pct: bool = False) -> str:
        r = per_recipe[(per_recipe["group"] == g) & (per_recipe["metric"] == metric)]
        return "" if r.empty else _fmt(*r[["mean", "lo", "hi"]].iloc[0], digits, pct)

    lines = ["### Per recipe (mean [95 % t-interval over seeds])", "",
             "| recipe | seeds | eval acc % | layer3 detectors (of 64) | layer3 fraction % | "
             "layer4 detectors (of 128) | layer4 fraction % | entropy T=1 (nats) |",
             "|---|---|---|---|---|---|---|---|"]
    groups = [g for g in ["teacher", *RECIPE_ORDER] if (pm["group"] == g).any()]
    for g in groups:
        n = int((pm["group"] == g).sum())
        u3 = int(pm.loc[pm["group"] == g, "layer3_units"].iloc[0])
        u4 = int(pm.loc[pm["group"] == g, "layer4_units"].iloc[0])
        lines.append(f"| {g} | {n} | {cell(g, 'eval_accuracy', 1, True)} | "
                     f"{cell(g, 'layer3_detectors')} (of {u3}) | "
                     f"{cell(g, 'layer3_fraction', 1, True)} | {cell(g, 'layer4_detectors')} "
                     f"(of {u4}) | {cell(g, 'layer4_fraction', 1, True)} | "
                     f"{cell(g, 'entropy_T1', 3)} |")
    lines += ["", "### Similarity transfer (students; mean [95 % t-interval over seeds])", "",
              "| recipe | Pearson with teacher, T=4 | KL(teacher‖student), T=4 | "
              "Spearman with concept overlap, T=1 | same, T=4 | entropy T=4 (nats) |",
              "|---|---|---|---|---|---|"]
    for g in groups:
        lines.append(f"| {g} | {cell(g, 'pearson_T4', 3)} | {cell(g, 'kl_T4', 3)} | "
                     f"{cell(g, 'hierarchy_spearman_T1', 3)} | "
                     f"{cell(g, 'hierarchy_spearman_T4', 3)} | {cell(g, 'entropy_T4', 3)} |")
    lines += ["", "### Paired differences over seeds (mean [95 % t-interval]; per-seed values)",
              "", "| comparison | metric | mean [95 % CI] | per seed |", "|---|---|---|---|"]
    for _, r in paired.iterrows():
        pct = r["metric"] in ("eval_accuracy", "layer3_fraction", "layer4_fraction")
        digits = 3 if r["metric"].startswith(("entropy", "pearson", "kl", "hier")) else 1
        vals = ", ".join(f"{v * (100 if pct else 1):.{digits}f}" for v in r["values"])
        lines.append(f"| {r['comparison']} | {r['metric']}{' (pts %)' if pct else ''} | "
                     f"{_fmt(r['mean'], r['lo'], r['hi'], digits, pct)} | {vals} |")
    cats = pd.read_csv(out / "categories.csv")
    lines += ["", "### Detectors per category (mean over seeds)", "",
              "| recipe | layer | " + " | ".join(sorted(cats["category"].unique())) + " |",
              "|---|---|" + "---|" * cats["category"].nunique()]
    piv = cats.groupby(["group", "layer", "category"])["detectors"].mean().unstack("category")
    for g in groups:
        for layer in LAYERS:
            if (g, layer) in piv.index:
                vals = " | ".join(f"{v:.1f}" for v in piv.loc[(g, layer)].to_numpy())
                lines.append(f"| {g} | {layer} | {vals} |")
    lines += ["", "### Per model", "", "| model | eval acc % | layer3 det. | layer4 det. | "
              "entropy T=1 | Pearson T=4 |", "|---|---|---|---|---|---|"]
    for _, r in pm.iterrows():
        lines.append(f"| {r['model']} | {100 * r['eval_accuracy']:.1f} | "
                     f"{r['layer3_detectors']} | {r['layer4_detectors']} | "
                     f"{r['entropy_T1']:.3f} | {r.get('pearson_T4', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


DOCS_IMG = HERE.parents[1] / "docs" / "img"
PALETTE = {"teacher": "black", "scratch": "#4c72b0", "ls": "#dd8452", "kd-T1": "#c7e9c0",
           "kd-T2": "#74c476", "kd-T4": "#238b45", "kd-T8": "#00441b", "untrained": "#8c8c8c"}


def _recipe_stats(per_recipe: pd.DataFrame, group: str, metric: str) -> tuple[float, float, float]:
    """(mean, lo, hi) of one recipe's metric from ``per_recipe.csv`` (t-interval over seeds)."""
    r = per_recipe[(per_recipe["group"] == group) & (per_recipe["metric"] == metric)]
    if r.empty:
        return float("nan"), float("nan"), float("nan")
    return tuple(float(x) for x in r[["mean", "lo", "hi"]].iloc[0])  # type: ignore[return-value]


def figures(out: Path, docs_img: Path = DOCS_IMG) -> list[Path]:
    """The three figures of docs/reproduction.md, drawn from the CSVs ``summarise`` wrote
    (``per_model.csv``, ``per_recipe.csv``), so they can be redrawn without re-measuring.

    * ``reproduction_detectors.png``: detectors in layer3 / layer4 per recipe, one point per
      seed, mean and 95 % t-interval over seeds, the teacher as a reference line;
    * ``reproduction_temperature.png``: the KD temperature sweep (T 1, 2, 4, 8): Pearson
      with the teacher's class similarity (T 4) and layer4 detectors, mean and t-interval
      over seeds, scratch as a reference band (its mean and t-interval);
    * ``reproduction_mechanism.png``: per trained student, layer4 detector fraction against
      similarity transfer (Pearson with the teacher, T 4), Spearman correlation and p
      (``scipy.stats.spearmanr``) in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from scipy import stats

    pm = pd.read_csv(out / "per_model.csv")
    pr = pd.read_csv(out / "per_recipe.csv")
    docs_img.mkdir(parents=True, exist_ok=True)
    sns.set_theme(style="whitegrid", context="notebook", font_scale=0.85)
    written = []

    # (a) detectors per recipe
    order = ["scratch", "ls", "kd-T4", "untrained"]
    units = {layer: int(pm[f"{layer}_units"].iloc[0]) for layer in LAYERS}
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.2), sharey=False)
    for ax, layer in zip(axes, LAYERS):
        metric = f"{layer}_detectors"
        sub = pm[pm["group"].isin(order)]
        sns.stripplot(data=sub, x="group", y=metric, order=order, hue="group",
                      palette=PALETTE, ax=ax, size=6, jitter=0.12, alpha=0.8, legend=False)
        for i, g in enumerate(order):
            m, lo, hi = _recipe_stats(pr, g, metric)
            ax.errorbar(i + 0.28, m, yerr=[[m - lo], [hi - m]], fmt="D", color="black",
                        ms=5, capsize=3, lw=1.2)
        t = float(pm.loc[pm["group"] == "teacher", metric].iloc[0])
        ax.axhline(t, ls="--", color="black", lw=1)
        ax.text(len(order) - 0.55, t, f"teacher {t:.0f}", ha="right", va="bottom", fontsize=8)
        ax.set_title(f"{layer} detectors (of {units[layer]} units)")
        ax.set_xlabel("")
        ax.set_ylabel("detectors (IoU >= 0.04)")
        ax.set_ylim(-1, max(ax.get_ylim()[1], t) * 1.1)
    fig.suptitle("points: seeds; diamond: mean, 95 % t-interval over 3 seeds", fontsize=8,
                 y=0.02, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    written.append(docs_img / "reproduction_detectors.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # (b) the temperature sweep
    temps = [1, 2, 4, 8]
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.0))
    for ax, metric, label in zip(axes, ("pearson_T4", "layer4_detectors"),
                                 ("Pearson with the teacher's class similarity (T 4)",
                                  "layer4 detectors (of 128)")):
        m, lo, hi = _recipe_stats(pr, "scratch", metric)
        ax.axhspan(lo, hi, color=PALETTE["scratch"], alpha=0.15, lw=0)
        ax.axhline(m, color=PALETTE["scratch"], lw=1, label="scratch (mean, t-interval)")
        ms, los, his = zip(*[_recipe_stats(pr, f"kd-T{t}", metric) for t in temps])
        ax.errorbar(temps, ms, yerr=[np.subtract(ms, los), np.subtract(his, ms)], fmt="-o",
                    color=PALETTE["kd-T4"], capsize=3, label="KD (mean, t-interval)")
        for t in temps:
            v = pm.loc[pm["group"] == f"kd-T{t}", metric].to_numpy()
            ax.scatter(np.full(len(v), t * 1.08), v, s=12, color="grey", zorder=3)
        if metric == "layer4_detectors":
            tv = float(pm.loc[pm["group"] == "teacher", metric].iloc[0])
            ax.axhline(tv, ls="--", color="black", lw=1, label=f"teacher ({tv:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(temps, [str(t) for t in temps])
        ax.set_xlabel("KD temperature T")
        ax.set_title(label)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    written.append(docs_img / "reproduction_temperature.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # (c) mechanism: similarity transfer vs detectors, trained students
    # (untrained controls are left out: they sit at (0, 0) and would make any
    # correlation look strong)
    st = pm[~pm["group"].isin(["teacher", "untrained"])].copy()
    rho, p = stats.spearmanr(st["pearson_T4"], st["layer4_fraction"])
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    hue_order = [g for g in RECIPE_ORDER if g in set(st["group"])]
    sns.scatterplot(data=st, x="pearson_T4", y="layer4_fraction", hue="group",
                    hue_order=hue_order, palette=PALETTE, s=45, ax=ax)
    tf = float(pm.loc[pm["group"] == "teacher", "layer4_fraction"].iloc[0])
    ax.axhline(tf, ls="--", color="black", lw=1)
    ax.text(st["pearson_T4"].max(), tf, "teacher", ha="right", va="bottom", fontsize=8)
    ax.set_ylim(top=tf * 1.1)
    ax.set_xlabel("similarity transfer: Pearson with the teacher (T 4)")
    ax.set_ylabel("layer4 detector fraction")
    ax.set_title(f"{len(st)} trained students: Spearman rho = {rho:.2f} (p = {p:.2g})",
                 fontsize=9)
    ax.legend(fontsize=7, title=None, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    written.append(docs_img / "reproduction_mechanism.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=HERE / "runs")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bootstrap", type=int, default=0,
                    help="also: paired bootstrap over probe images for seed 0 (resamples)")
    ap.add_argument("--measure-only", action="store_true",
                    help="cache and dissect the runs finished so far, no tables")
    ap.add_argument("--figures-only", action="store_true",
                    help="only redraw docs/img/reproduction_*.png from the CSVs in --out")
    ap.add_argument("--docs-img", type=Path, default=DOCS_IMG)
    args = ap.parse_args()
    if args.figures_only:
        for path in figures(args.out, args.docs_img):
            print(path)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    per_model = measure(args.runs, args.out, args.threads)
    if args.measure_only:
        return
    est = transfer(args.runs, args.out, per_model)
    summarise(per_model, est, args.out)
    if args.bootstrap:
        print(probe_bootstrap(args.out, 0, args.bootstrap).to_string())
    print((args.out / "tables.md").read_text())
    for path in figures(args.out, args.docs_img):
        print(path)


if __name__ == "__main__":
    main()
