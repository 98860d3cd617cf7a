"""What fine-tuning should keep of its runs, judged on the validation split alone (prints figures; not a test).

    python bench/selection.py                        # after `dvc repro` up to train: data/ and models/baseline.keras
    python bench/selection.py --halvings 50 --record /tmp/runs   # keep the recorded runs; --reuse reads them back
    python bench/selection.py --members 2 --epochs 2 --halvings 2  # a quick look that the script runs

Fine-tuning is run as the finetune stage would (params.yaml; `finetune.members` runs), except that every run
goes through all `finetune.epochs` (no patience) and every epoch's validation probabilities and top-block
weights are recorded. Then each way of keeping the runs is cross-validated *inside* validation: the split is
halved at random (stratified) `--halvings` times, and each half in turn makes every choice a procedure makes
(checkpoints, which runs to average) while the other half scores it. Scoring on the images that made the
choices flatters a procedure that makes many of them (the winner's curse); the held-out halves do not.
Figures: mean macro ROC-AUC, COVID (positive-class) sensitivity at specificity 0.95 and class-weighted loss
on the held-out halves, and how often each beats the `best` procedure there. The test split is never read.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cxr import quiet  # noqa: E402

quiet.tensorflow()
import numpy as np  # noqa: E402

from cxr import data, metrics, models, params, paths, training  # noqa: E402


def record(p: dict, out: Path) -> dict:
    """Fine-tune as the stage does, all epochs of every run, recording each epoch's validation probabilities
    (in the result) and top-block weights (out/m<run>_e<epoch>.npz)."""
    from dvclive import Live

    recorded: list[list[np.ndarray]] = []

    class Recording(training.Selector):
        def score(self, epoch, model):
            if epoch == 0:
                recorded.append([])
            recorded[-1].append(np.asarray(self.predict_val(), np.float32))
            np.savez(out / f"m{len(recorded) - 1}_e{epoch}.npz", *model.get_weights())
            return super().score(epoch, model)

    p["finetune"].update(patience=p["finetune"]["epochs"] + 1, select="best")
    ds = params.dataset(p)
    splits = data.load_splits(ds["classes"], only=("train", "val"), masks=False)
    stage_selector, training.Selector = training.Selector, Recording  # finetune builds its Selectors through the module
    try:
        with tempfile.TemporaryDirectory() as live_dir:
            training.finetune(p, ds["classes"], splits, paths.BASELINE, Live(dir=live_dir, dvcyaml=False, save_dvc_exp=False, report=None),
                              ds["classes"].index(ds["positive"]))
    finally:
        training.Selector = stage_selector  # compare() scores with the stage's own, recording nothing
    tr = splits["train"].labels
    rec = {"proba": [np.stack(r) for r in recorded], "y": np.asarray(splits["val"].labels),
           "class_weight": training.class_weights(tr, len(ds["classes"]), p["train"]["class_weight"]),
           "positive": ds["classes"].index(ds["positive"])}
    with open(out / "runs.pkl", "wb") as f:
        pickle.dump(rec, f)
    return rec


class Soups:
    """Validation probabilities of the uniform weight average of (run, epoch) checkpoints, memoised: the top
    blocks and head on the validation split's cached activations at the cut."""

    def __init__(self, p: dict, weights_dir: Path):
        cfg, ds = p["finetune"], params.dataset(p)
        va = data.load_splits(ds["classes"], only=("val",), masks=False)["val"]
        model = models.load(paths.BASELINE)
        models.unfreeze_from(model, cfg["unfreeze_from"], freeze_batchnorm=models.pretrained(p["model"]))
        lower, top = models.split_backbone(model, cfg["unfreeze_from"])
        self.x = training.cache_views(model, lower, va.images, 0, None, cfg["batch_size"])[0].astype(np.float32)
        self.model, self.dir, self.memo = models.top_model(model, top), weights_dir, {}

    def __call__(self, members) -> np.ndarray:
        key = tuple(sorted(members))
        if key not in self.memo:
            ws = [list(np.load(self.dir / f"m{m}_e{e}.npz").values()) for m, e in key]
            self.model.set_weights([np.mean([w[i] for w in ws], axis=0) for i in range(len(ws[0]))])
            self.memo[key] = self.model.predict(self.x, batch_size=64, verbose=0)
        return self.memo[key]


class _NoWeights:
    """What the Selector keeps when it only scores recorded predictions."""

    def get_weights(self):
        return None


_NO_WEIGHTS = _NoWeights()


def compare(rec: dict, soups, halvings: int, monitor: str, patience: int, seed: int = 0) -> dict:
    proba, y, positive, cw = rec["proba"], rec["y"], rec["positive"], rec["class_weight"]
    k, runs, last = proba[0].shape[2], len(proba), min(r.shape[0] for r in proba) - 1
    judge = training.Selector(None, None, positive, monitor, 0.95, patience)  # the stage's key: monitor, then loss

    def scores(idx, pr):  # what the stage scores on validation, on the images `idx` only
        return metrics.selection_scores(y[idx], pr[idx], positive, 0.95, cw)

    def checkpoint(m, idx):  # the stage's own Selector, choosing on `idx` alone: (epoch, its key)
        epochs = iter(proba[m])
        sel = training.Selector(lambda: next(epochs)[idx], y[idx], positive, monitor, 0.95, patience, class_weight=cw)
        for e in range(proba[m].shape[0]):
            sel.score(e, _NO_WEIGHTS)
            if e - sel.best_epoch >= patience:
                break
        return sel.best_epoch, sel.best_key

    def greedy(idx, chosen, combine):  # _greedy_soup's choice on `idx`, on memoised soup predictions
        order = sorted(range(runs), key=lambda m: chosen[m][1], reverse=True)
        kept, best = [order[0]], None
        for m in order:
            trial = kept if m == order[0] else kept + [m]
            key = judge.key(scores(idx, combine([(i, chosen[i][0]) for i in trial])))
            if best is None or key >= best:
                kept, best = trial, key
        return combine([(i, chosen[i][0]) for i in kept])

    mean_softmax = lambda ck: np.mean([proba[m][e] for m, e in ck], axis=0)  # noqa: E731
    procs = {
        "best: best epoch per run, greedy weight soup": lambda A: greedy(A, {m: checkpoint(m, A) for m in range(runs)}, soups),
        "best epoch per run, softmaxes averaged": lambda A: mean_softmax([(m, checkpoint(m, A)[0]) for m in range(runs)]),
        "last: final weights, softmaxes averaged": lambda A: mean_softmax([(m, last) for m in range(runs)]),
        "final weights, uniform weight soup": lambda A: soups(tuple((m, last) for m in range(runs))),
        "final weights of run 0 alone": lambda A: proba[0][last],
        "baseline (epoch 0)": lambda A: proba[0][0],
    }
    rng = np.random.default_rng(seed)
    rows = {name: [] for name in procs}
    for _ in range(halvings):
        a = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: (y == c).sum() // 2] for c in range(k)])
        b = np.setdiff1d(np.arange(len(y)), a)
        for choose, score in ((a, b), (b, a)):
            for name, f in procs.items():
                rows[name].append(scores(score, f(choose)))
    everything = np.arange(len(y))
    shown = {"auc": "macro_roc_auc", "sens95": "sensitivity_at_specificity", "loss": "loss"}
    return {name: {"held_out": {m: float(np.nanmean([r[key] for r in rs])) for m, key in shown.items()},
                   "wins": float(np.mean([r["macro_roc_auc"] > c["macro_roc_auc"] for r, c in zip(rs, rows[next(iter(procs))])])),
                   "chosen_and_scored_on_all": scores(everything, procs[name](everything))["macro_roc_auc"]}
            for name, rs in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--halvings", type=int, default=50)
    ap.add_argument("--record", type=Path, help="folder for the recorded runs (default: a temporary one)")
    ap.add_argument("--reuse", action="store_true", help="read the runs recorded in --record instead of training")
    ap.add_argument("--members", type=int, help="runs (default: finetune.members)")
    ap.add_argument("--epochs", type=int, help="epochs per run (default: finetune.epochs; fewer for a quick look)")
    args = ap.parse_args()
    p = params.load()
    p["finetune"].update({k: v for k, v in (("members", args.members), ("epochs", args.epochs)) if v})
    with tempfile.TemporaryDirectory() as tmp:
        out = args.record or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            with open(out / "runs.pkl", "rb") as f:
                rec = pickle.load(f)
        else:
            rec = record(p, out)
        result = compare(rec, Soups(p, out), args.halvings, p["finetune"]["monitor"], p["finetune"]["patience"])
    print(f"{len(rec['proba'])} runs x {rec['proba'][0].shape[0] - 1} epochs, {len(rec['y'])} validation images, "
          f"{args.halvings} halvings x 2: one half chooses, the other scores")
    print(f"{'what is kept':48s} {'AUC':>7s} {'sens@.95':>8s} {'loss':>7s} {'wins':>5s} {'AUC, chosen on all':>19s}")
    for name, r in result.items():
        h = r["held_out"]
        print(f"{name:48s} {h['auc']:7.4f} {h['sens95']:8.3f} {h['loss']:7.3f} {r['wins']:5.2f} {r['chosen_and_scored_on_all']:19.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
