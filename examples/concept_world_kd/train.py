"""Train the four shipped demo models on concept-world: a teacher and three students.

The paper's setting in miniature (Han et al., ICML 2023): a wider/deeper teacher
(``interptool:cw-teacher``) and one student architecture (``interptool:cw-student``) trained
three ways from the same initialisation and the same batch order:

* ``scratch``: cross-entropy on the hard labels;
* ``ls``: cross-entropy with label smoothing, epsilon 0.1;
* ``kd``: torchdistill ``KDLoss``: alpha * CE(y) + (1 - alpha) * T^2 * KL(p_t^T || p_s^T),
  alpha 0.5, T 4, with the teacher's logits precomputed once (only horizontal flips are used as
  augmentation, so both views' logits are computed up front and no teacher forward pass is
  needed during student training).

Deterministic: seeded RNGs, a seeded batch order, ``torch.use_deterministic_algorithms`` and a
fixed number of threads (recorded; a different thread count may change the last bits).
Writes ``<out>/<model>.safetensors`` (float16) and ``<out>/manifest.json`` with sha256,
recipe, data parameters, accuracies and timings.

    python examples/concept_world_kd/train.py --out interptool/weights   # ~3 min on an idle core
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RECIPE = {
    "optimizer": "SGD",
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "schedule": "cosine to 0, per step",
    "batch_size": 64,
    "epochs_teacher": 5,
    "epochs_student": 6,
    "augmentation": "random horizontal flip (p=0.5)",
    "label_smoothing_epsilon": 0.1,
    "kd_alpha": 0.5,
    "kd_temperature": 4.0,
    "kd_loss": "alpha*CE(y) + (1-alpha)*T^2*KL(softmax(z_t/T) || softmax(z_s/T)) (batchmean)",
    "seed_init_teacher": 1,
    "seed_init_student": 2,
    "seed_batches": 3,
}
DATA = {"n_train": 2000, "n_eval": 500, "size": 64, "seed": 0}


def _spec(split: str, n: int) -> str:
    # version 1: the set these demo nets were trained on (docs/data.md, "Two versions")
    return (f"builtin:concept-world?version=1&n={n}&size={DATA['size']}&seed={DATA['seed']}"
            f"&split={split}")


def load_tensors(spec: str, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as one normalised float tensor (small: 3000 x 3 x 64 x 64)."""
    from interptool.data import open_dataset

    ds = open_dataset(spec)
    imgs = np.stack([np.asarray(ds.load_image(i).convert("RGB"), dtype=np.uint8)
                     for i in range(len(ds))])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    y = torch.as_tensor(np.asarray(ds.labels), dtype=torch.long)
    if (y < 0).any():
        raise SystemExit(f"{spec}: unlabelled images; concept-world must provide class labels")
    return x.contiguous(), y


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])


def train(model, x, y, epochs: int, loss_fn, seed: int, log: str) -> float:
    """SGD with cosine decay; ``loss_fn(logits, y, idx, flipped)``; returns seconds taken."""
    r = RECIPE
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=r["momentum"],
                          weight_decay=r["weight_decay"], nesterov=True)
    steps_per_epoch = (len(x) + r["batch_size"] - 1) // r["batch_size"]
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)  # same order for every student
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        flips = torch.rand(len(x), generator=gen) < 0.5
        total, correct, loss_sum = 0, 0, 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * r["batch_size"]:(s + 1) * r["batch_size"]]
            xb = x[idx]
            fb = flips[idx]
            xb = torch.where(fb.view(-1, 1, 1, 1), xb.flip(3), xb)
            logits = model(xb)
            loss = loss_fn(logits, y[idx], idx, fb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            total += len(idx)
        print(f"[{log}] epoch {epoch + 1}/{epochs} loss {loss_sum / total:.4f} "
              f"train acc {correct / total:.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "interptool" / "weights"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="1 epoch, 300 images (smoke test)")
    ap.add_argument("--epochs-teacher", type=int, help=f"default {RECIPE['epochs_teacher']}")
    ap.add_argument("--epochs-student", type=int, help=f"default {RECIPE['epochs_student']}")
    ap.add_argument("--n-train", type=int, help=f"default {DATA['n_train']}")
    args = ap.parse_args()
    # overrides are written into the manifest's recipe, so the files stay self-describing
    for key, val in (("epochs_teacher", args.epochs_teacher),
                     ("epochs_student", args.epochs_student)):
        if val is not None:
            RECIPE[key] = val
    if args.n_train is not None:
        DATA["n_train"] = args.n_train
    if args.quick:
        RECIPE.update(epochs_teacher=1, epochs_student=1)
        DATA.update(n_train=300, n_eval=100)

    from safetensors.torch import save_file

    from interptool._provenance import sha256_file, versions
    from interptool.loading._zoo import ZOO_PREPROCESSING, cw_student, cw_teacher

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pre = ZOO_PREPROCESSING["cw-teacher"]
    t_start = time.time()
    x_tr, y_tr = load_tensors(_spec("train", DATA["n_train"]), pre["mean"], pre["std"])
    x_ev, y_ev = load_tensors(_spec("eval", DATA["n_eval"]), pre["mean"], pre["std"])
    num_classes = int(max(y_tr.max(), y_ev.max())) + 1
    print(f"data: train {tuple(x_tr.shape)}, eval {tuple(x_ev.shape)}, {num_classes} classes "
          f"({time.time() - t_start:.0f}s)", flush=True)

    results: dict[str, dict] = {}

    def finish(name: str, arch: str, model: torch.nn.Module, seconds: float, loss: str) -> None:
        # float16 halves the size; BN counters stay integer. The model is evaluated with the
        # weights as shipped (rounded to float16; load_state_dict casts back), so the
        # manifest's accuracies are what a user reproduces from the files.
        sd = {k: (v.half() if v.is_floating_point() else v).contiguous()
              for k, v in model.state_dict().items()}
        model.load_state_dict(sd)
        acc_tr = float((predict(model, x_tr).argmax(1) == y_tr).float().mean())
        acc_ev = float((predict(model, x_ev).argmax(1) == y_ev).float().mean())
        path = out / f"{name}.safetensors"
        save_file(sd, str(path), metadata={"arch": arch, "name": name, "loss": loss})
        results[name] = {
            "file": path.name,
            "arch": arch,
            "sha256": sha256_file(path),
            "params": sum(p.numel() for p in model.parameters()),
            "loss": loss,
            "train_accuracy": round(acc_tr, 4),
            "eval_accuracy": round(acc_ev, 4),
            "train_seconds": round(seconds, 1),
        }
        print(f"{name}: eval acc {acc_ev:.3f} (train {acc_tr:.3f})", flush=True)

    # ---- teacher -------------------------------------------------------------------------
    torch.manual_seed(RECIPE["seed_init_teacher"])
    teacher = cw_teacher(num_classes)
    ce = lambda z, y, idx, fb: F.cross_entropy(z, y)  # noqa: E731
    sec = train(teacher, x_tr, y_tr, RECIPE["epochs_teacher"], ce, RECIPE["seed_batches"], "teacher")
    finish("teacher", "interptool:cw-teacher", teacher, sec, "CE")

    # Teacher logits for both views of every training image, computed once.
    z_plain = predict(teacher, x_tr)
    z_flip = predict(teacher, x_tr.flip(3))

    # ---- students: same init, same batches ------------------------------------------------
    T, alpha, eps = RECIPE["kd_temperature"], RECIPE["kd_alpha"], RECIPE["label_smoothing_epsilon"]

    def kd_loss(z, y, idx, fb):
        zt = torch.where(fb.view(-1, 1), z_flip[idx], z_plain[idx])
        kl = F.kl_div(F.log_softmax(z / T, 1), F.log_softmax(zt / T, 1), reduction="batchmean",
                      log_target=True)
        return alpha * F.cross_entropy(z, y) + (1 - alpha) * T * T * kl

    students = {
        "scratch": (ce, "CE"),
        "ls": (lambda z, y, idx, fb: F.cross_entropy(z, y, label_smoothing=eps),
               f"CE with label smoothing {eps}"),
        "kd": (kd_loss, f"KD from teacher: alpha {alpha}, T {T}"),
    }
    for name, (fn, desc) in students.items():
        torch.manual_seed(RECIPE["seed_init_student"])
        student = cw_student(num_classes)
        sec = train(student, x_tr, y_tr, RECIPE["epochs_student"], fn, RECIPE["seed_batches"], name)
        finish(name, "interptool:cw-student", student, sec, desc)

    manifest = {
        "description": "Demo models for `interptool demo`, trained on concept-world by "
        "examples/concept_world_kd/train.py",
        "data": {**DATA, "train_spec": _spec("train", DATA["n_train"]),
                 "eval_spec": _spec("eval", DATA["n_eval"]), "num_classes": num_classes},
        "recipe": RECIPE,
        "models": results,
        "threads": args.threads,
        "deterministic": True,
        "versions": versions(),
        "total_seconds": round(time.time() - t_start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({k: v["eval_accuracy"] for k, v in results.items()}))


if __name__ == "__main__":
    main()
