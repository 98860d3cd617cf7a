"""Training: the frozen-backbone baseline (optionally on cached features) and fine-tuning."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from . import atomic, backend, data, metrics, models, paths, progress
from .modelinfo import model_info, save  # the model file and its info sidecar

log = logging.getLogger("training")


def augmented(model, augment):
    """`model` with the augmentation layers (data.augmenter) in front, for fit: they run inside the training step
    (on the accelerator, seeded, identity at inference) and the saved model stays `model`, whose layers the
    wrapper shares. `model` itself when there is no augmentation."""
    import keras

    if augment is None:
        return model
    inp = keras.Input(model.input_shape[1:], name="image")
    return keras.Model(inp, model(augment(inp)), name=f"{model.name}_augmented")


def _augmentation(model, augment, runtime: dict):
    """(model to fit, augmentation for data.batches): the augmentation inside the compiled training step
    (augmented), except under TensorFlow with XLA (runtime.xla), whose compilers lack the image-transform op
    (ImageProjectiveTransformV3): there data.batches applies it to each batch as it reads it."""
    if augment is not None and backend.name() == "tensorflow" and runtime["xla"]:
        return model, augment
    return augmented(model, augment), None


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """sklearn's 'balanced' weights (n / (k * count)), or None."""
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    w = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(x) for c, x in zip(present, w)} | {c: 1.0 for c in range(n_classes) if c not in present}


# The baseline selects on validation loss; its summary also shows sensitivity at this specificity.
BASELINE_SPECIFICITY = 0.95


def ema_momentum(epochs: float, steps_per_epoch: int) -> float:
    """The per-step momentum of a moving average over about `epochs` epochs of steps, whatever the batch and
    dataset size: 1 - 1/window; 0 (the raw weights) for a window of one step or less."""
    return max(0.0, 1 - 1 / (epochs * steps_per_epoch))


@contextlib.contextmanager
def averaged_weights(model):
    """Inside, `model`'s trainable weights are its optimizer's moving average of them (Keras' `use_ema`), once
    the optimizer has taken a step; the raw weights, which training goes on from, are put back on leaving.
    Without an averaging optimizer, nothing changes. Under mixed precision Keras wraps the optimizer in a
    LossScaleOptimizer; the average is the wrapped one's."""
    opt = getattr(model, "optimizer", None)
    opt = getattr(opt, "inner_optimizer", opt)
    if opt is None or not getattr(opt, "use_ema", False) or int(backend.to_numpy(opt.iterations)) == 0:
        yield
        return
    raw = [backend.to_numpy(v.value) for v in model.trainable_variables]
    opt.finalize_variable_values(model.trainable_variables)
    try:
        yield
    finally:
        for v, w in zip(model.trainable_variables, raw):
            v.assign(w)


class Selector:
    """Checkpoint selection on validation: scores the starting weights (epoch 0) and every epoch with
    metrics.selection_scores, keeps the best weights by `monitor` (ties broken by lower loss), and stops after
    `patience` epochs without improvement. Where the start is a real model (fine-tuning starts from the
    baseline) it is kept when no epoch beats it (the guard); a randomly initialised start is never chosen."""

    def __init__(self, predict_val, y_val: np.ndarray, positive: int, monitor: str, specificity: float, patience: int,
                 class_weight: dict | None = None, start_is_candidate: bool = True):
        self.predict_val, self.y, self.positive = predict_val, y_val, positive
        self.monitor, self.specificity, self.patience = monitor, specificity, patience
        self.class_weight, self.start_is_candidate = class_weight, start_is_candidate
        self.history: list[dict] = []
        self.best_epoch, self.best_key, self.best_weights = None, None, None

    def key(self, s: dict) -> tuple:
        primary = -s["loss"] if self.monitor == "loss" else s[self.monitor]
        return (primary if np.isfinite(primary) else -np.inf, -s["loss"])

    def score(self, epoch: int, model) -> dict:
        with averaged_weights(model):
            s = metrics.selection_scores(self.y, self.predict_val(), self.positive, self.specificity, self.class_weight)
            self.history.append({"epoch": epoch, **s})
            if epoch == 0 and not self.start_is_candidate:
                return s
            if self.best_key is None or self.key(s) > self.best_key:
                self.best_epoch, self.best_key, self.best_weights = epoch, self.key(s), model.get_weights()
        return s

    def callback(self, model):
        import keras

        selector = self

        class _Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if not selector.history:
                    selector.score(0, model)

            def on_epoch_end(self, epoch, logs=None):
                s = selector.score(epoch + 1, model)
                if logs is not None:  # the dvclive callback after this one logs them as eval/<name>
                    logs.update({f"val_{k}": v for k, v in s.items()})
                if selector.best_epoch is not None and epoch + 1 - selector.best_epoch >= selector.patience:
                    model.stop_training = True

        return _Callback()

    def summary(self, epoch: int) -> dict:
        """Epochs run, `epoch` as the one kept, and its and the start's validation scores."""
        return {"epochs_run": len(self.history) - 1, "best_epoch": epoch, "monitor": self.monitor,
                **_rounded(self.history[epoch]), "start": _rounded(self.history[0])}

    def last(self) -> dict:
        """The summary of the last epoch scored (finetune.select: last)."""
        return self.summary(len(self.history) - 1)

    def restore(self, model) -> dict:
        model.set_weights(self.best_weights)
        if self.best_epoch == 0 and len(self.history) > 1:
            log.warning("no epoch beat the starting weights on validation %s: keeping them", self.monitor)
        return self.summary(self.best_epoch)


def _rounded(scores: dict) -> dict:
    """Validation scores as a summary shows them: val_<name>, 6 decimals."""
    return {f"val_{k}": round(v, 6) for k, v in scores.items() if k != "epoch"}


def progress_callback(total: int, desc: str, unit: str, shown: tuple[str, ...] = ()):
    """A Keras callback drawing a progress.bar (on a terminal only): one step per epoch in fit, with the epoch's
    logs named in `shown` (loss, validation figures) beside it, or one per batch in predict."""
    import keras

    class _Bar(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.bar = progress.bar(total=total, desc=desc, unit=unit)

        on_predict_begin = on_train_begin

        def on_epoch_end(self, epoch, logs=None):
            self.bar.set_postfix({k: f"{logs[k]:.4f}" for k in shown if k in (logs or {})}, refresh=False)
            self.bar.update()

        def on_predict_batch_end(self, batch, logs=None):
            self.bar.update()

        def on_train_end(self, logs=None):
            self.bar.close()

        on_predict_end = on_train_end

    return _Bar()


def _predict(model, x, batch_size: int, multiple_of: int = 1, callbacks=()) -> np.ndarray:
    """model.predict on an array or a data.batches dataset (batched already), for all its rows (a dataset's padding
    trimmed); with data parallelism over `multiple_of` devices, through data.batches, which pads the last batch to
    split evenly."""
    import keras

    if isinstance(x, keras.utils.PyDataset):
        return model.predict(x, verbose=0, callbacks=list(callbacks))[: getattr(x, "n", None)]
    if multiple_of > 1:
        return _predict(model, data.batches(x, None, batch_size, multiple_of=multiple_of), batch_size, callbacks=callbacks)
    return model.predict(x, batch_size=batch_size, verbose=0, callbacks=list(callbacks))


def _sample_weights(labels: np.ndarray, class_weight: dict[int, float] | None) -> np.ndarray:
    """Per-sample weights from class_weights() (all 1 without them)."""
    return np.ones(len(labels), np.float32) if class_weight is None else np.array([class_weight[int(c)] for c in labels], np.float32)


def _logistic_reference(train_x, train_y, val_x, val_y, positive: int, specificity: float, class_weight=None) -> dict:
    """sklearn's logistic regression on the same cached features (balanced class weights, C=1), scored on
    validation: the floor the Keras head must reach."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1.0, max_iter=5000, class_weight="balanced").fit(train_x, train_y)
    s = metrics.selection_scores(val_y, lr.predict_proba(val_x), positive, specificity, class_weight)
    return {f"val_{k}": round(v, 6) for k, v in s.items()}


def baseline(p: dict, classes: list[str], splits: dict[str, data.Subset], live, positive: int = 0) -> tuple[object, dict]:
    """Build the frozen-backbone model and train its head to convergence: Adam with cosine decay, L2 on the
    head, class weights, early stopping on validation loss. With train.feature_cache the backbone runs once
    over train and val (no augmentation) and the head trains on the cached pooled features; a logistic
    regression on the same features is scored beside it, so the summary shows whether the head converged."""
    import keras

    cfg, runtime = p["train"], p["runtime"]
    backend.seed_everything(cfg["seed"], deterministic=not runtime["xla"])
    devices = backend.configure(runtime)
    bs = cfg["batch_size"] * devices.replicas
    size = splits["train"].images.shape[1]
    with devices.scope():
        model = models.build(p["model"]["arch"], len(classes), size, p["model"]["weights"], p["model"]["alpha"],
                             p["model"]["dropout"], l2=cfg["l2"], init=p["model"]["init"])
    tr, va = splits["train"], splits["val"]
    spec = BASELINE_SPECIFICITY
    summary: dict = {}
    if p["model"]["init"] != "none":
        summary["init"] = models.initialise_from(model, p["model"]["init"], classes, p["model"]["alpha"])
        log.info("started from %s: backbone copied%s", p["model"]["init"], ", head too (same classes)" if summary["init"]["head"] else "")
    if cfg["feature_cache"]:
        t0 = time.perf_counter()
        extractor = models.feature_extractor(model)
        x_train, x_val = (_predict(extractor, data.batches(s.images, None, bs, multiple_of=devices.replicas), bs,
                                   callbacks=[progress_callback(-(-len(s) // bs), f"features: {name}", "batch")])
                          for name, s in (("train", tr), ("val", va)))
        summary["feature_cache_seconds"] = time.perf_counter() - t0
        log.info("cached backbone features for %d images in %.1fs", len(tr) + len(va), summary["feature_cache_seconds"])
        with devices.scope():
            trained = models.head(model)
        fit_data = ({"x": x_train, "y": tr.labels, "batch_size": bs, "shuffle": True} if devices.replicas == 1 else
                    {"x": data.batches(x_train, tr.labels, bs, shuffle=True, seed=cfg["seed"], multiple_of=devices.replicas), "shuffle": False})
    else:
        with devices.scope():
            trained, on_host = _augmentation(model, data.augmenter(cfg["augment"], cfg["seed"]), runtime)
        # the dataset shuffles itself (seeded); Keras' own shuffle does not apply to one
        fit_data = {"x": data.batches(tr.images, tr.labels, bs, shuffle=True, seed=cfg["seed"], multiple_of=devices.replicas,
                                      augment=on_host), "shuffle": False}
        x_val = data.batches(va.images, None, bs, multiple_of=devices.replicas)
    steps = cfg["epochs"] * int(np.ceil(len(tr) / bs))
    trained.compile(optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(cfg["learning_rate"], steps)),
                    loss="sparse_categorical_crossentropy", metrics=["accuracy"], **backend.compile_kwargs(runtime))
    class_weight = class_weights(tr.labels, len(classes), cfg["class_weight"])
    selector = Selector(lambda: _predict(trained, x_val, bs, devices.replicas), va.labels, positive, "loss", spec,
                        cfg["patience"], class_weight=class_weight, start_is_candidate=False)
    t0 = time.perf_counter()
    trained.fit(**fit_data, epochs=cfg["epochs"], class_weight=class_weight,
                callbacks=[selector.callback(trained), backend.live_callback(live),
                           progress_callback(cfg["epochs"], "training", "epoch", ("loss", "val_loss"))], verbose=0)
    seconds = time.perf_counter() - t0
    summary = {**selector.restore(trained), **summary}
    summary["seconds_per_epoch"] = seconds / max(1, summary["epochs_run"])
    if cfg["feature_cache"]:
        ref = summary["logistic_regression"] = _logistic_reference(x_train, tr.labels, x_val, va.labels, positive, spec, class_weight)
        log.info("validation, head vs logistic regression on the same features: loss %.4f vs %.4f, balanced accuracy "
                 "%.4f vs %.4f, macro ROC-AUC %.4f vs %.4f", summary["val_loss"], ref["val_loss"],
                 summary["val_balanced_accuracy"], ref["val_balanced_accuracy"], summary["val_macro_roc_auc"], ref["val_macro_roc_auc"])
    return model, summary


def _view_batches(views: list[np.ndarray], onehot: np.ndarray, sample_weights: np.ndarray, batch_size: int, seed: int,
                  multiple_of: int = 1, mixup: float = 0.0):
    """A keras.utils.PyDataset over cached boundary activations: every epoch each training image appears once,
    as one of its cached views (un-augmented or augmented) drawn at random, in shuffled order; seeded. With data
    parallelism over `multiple_of` devices, each epoch leaves out the last n % multiple_of of its order, so every
    batch splits evenly (data.batches).

    With `mixup` > 0 (manifold mixup at the cut, Verma et al. 2019), each image's activations are mixed with
    those of a random partner image (a random view of it), lam ~ Beta(mixup, mixup) per image and epoch. The
    partner's share of the loss keeps its own class weight: the sample weight is lam w1 + (1 - lam) w2 and the
    target (lam w1 y1 + (1 - lam) w2 y2) / that weight, so the weighted loss is the weighted mixture of the two
    images' losses. Its draws come from their own generator: order and views are those of mixup 0."""
    import keras

    class ViewBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.rng = np.random.default_rng(seed)
            self.mix_rng = np.random.default_rng([seed, 1])
            self.used = data.even(len(onehot), multiple_of)
            self.on_epoch_end()

        def on_epoch_end(self):
            self.order = self.rng.permutation(len(onehot))
            self.view = self.rng.integers(0, len(views), len(onehot))
            if mixup:
                n = len(onehot)
                self.lam = self.mix_rng.beta(mixup, mixup, n).astype(np.float32)
                self.partner = self.mix_rng.integers(0, n, n)
                self.partner_view = self.mix_rng.integers(0, len(views), n)

        def __len__(self):
            return int(np.ceil(self.used / batch_size))

        def __getitem__(self, i):
            idx = np.sort(self.order[i * batch_size : min(self.used, (i + 1) * batch_size)])
            gather = lambda which, images: np.stack([views[v][j] for v, j in zip(which, images)]).astype(np.float32)  # noqa: E731
            x = gather(self.view[idx], idx)
            if not mixup:
                return x, onehot[idx], sample_weights[idx]
            lam, other = self.lam[idx], self.partner[idx]
            x2 = gather(self.partner_view[idx], other)
            w1, w2 = lam * sample_weights[idx], (1 - lam) * sample_weights[other]
            weight = w1 + w2
            target = (w1[:, None] * onehot[idx] + w2[:, None] * onehot[other]) / weight[:, None]
            shape = (-1,) + (1,) * (x.ndim - 1)
            return lam.reshape(shape) * x + (1 - lam).reshape(shape) * x2, target.astype(np.float32), weight.astype(np.float32)

    return ViewBatches()


def _greedy_soup(model, runs: list, predict_val) -> dict:
    """Greedy model soup (Wortsman et al. 2022) of fine-tuning runs that share a start: members in order of their
    validation score; each is averaged into the soup (uniform weights) when that does not lower the soup's
    validation score (the Selector's key: monitor, then loss). Leaves the soup's weights in `model` and returns the
    first member's summary with the soup's validation scores and a `members` record."""
    order = sorted(range(len(runs)), key=lambda i: runs[i][2].key(runs[i][2].history[runs[i][0]["best_epoch"]]), reverse=True)
    judge = runs[0][2]
    average = lambda members: [np.mean([runs[j][1][k] for j in members], axis=0) for k in range(len(runs[0][1]))]  # noqa: E731
    soup, best_key, best_scores = [order[0]], None, None
    for i in order:
        trial = soup if i == order[0] else soup + [i]
        model.set_weights(average(trial))
        s = metrics.selection_scores(judge.y, predict_val(), judge.positive, judge.specificity, judge.class_weight)
        if best_key is None or judge.key(s) >= best_key:
            soup, best_key, best_scores = trial, judge.key(s), s
    model.set_weights(average(soup))
    log.info("greedy soup of members %s (of %d): validation %s %.4f", sorted(soup), len(runs), judge.monitor, best_scores[judge.monitor])
    return _combined_summary(runs, best_scores, {"soup": {"members": len(soup), "of": len(runs)}}, lambda i: {"in_soup": int(i in soup)})


def _combined_summary(runs: list, scores: dict, extra: dict, member_extra=lambda i: {}) -> dict:
    """The summary of runs combined into one model: the first run's, with the combination's validation
    `scores`, the epochs of all runs, `extra`, and a `members` record (each run's kept epoch and monitored
    score, and `member_extra(i)`)."""
    monitor = runs[0][2].monitor
    summary = {**runs[0][0], **_rounded(scores), "epochs_run": sum(r[0]["epochs_run"] for r in runs), **extra}
    summary["members"] = {str(i): {"epoch": r[0]["best_epoch"], f"val_{monitor}": r[0][f"val_{monitor}"], **member_extra(i)}
                          for i, r in enumerate(runs)}
    return summary


def _combine_last(trained, runs: list, predict_val, start: list) -> tuple[dict, np.ndarray]:
    """`finetune.select: last`: every member's final weights, their softmaxes averaged (one member: itself).
    The guard: when that does not beat the starting model (the baseline) on the monitored validation score,
    the start is kept. Leaves `trained` holding the start or, with one member, that member. Returns the summary
    (_combined_summary, `start_kept`, `ensemble`) and the validation probabilities to calibrate: (members, N, k),
    or (N, k) for one model."""
    judge = runs[0][2]
    member_proba = []
    for _, weights, _ in runs:
        trained.set_weights(weights)
        member_proba.append(predict_val())
    member_proba = np.stack(member_proba)
    s = metrics.selection_scores(judge.y, member_proba.mean(axis=0), judge.positive, judge.specificity, judge.class_weight)
    start_scores = judge.history[0]
    kept = judge.key(s) <= judge.key(start_scores)
    if kept:
        log.warning("the fine-tuned model%s did not beat the starting weights on validation %s: keeping them",
                    "s' ensemble" if len(runs) > 1 else "", judge.monitor)
        trained.set_weights(start)
        s, member_proba = start_scores, predict_val()[None]
    summary = _combined_summary(runs, s, {"start_kept": int(kept), "ensemble": {"members": 1 if kept else len(runs), "of": len(runs)}})
    summary["best_epoch"] = 0 if kept else summary["best_epoch"]
    return summary, member_proba if len(member_proba) > 1 else member_proba[0]


def cache_views(model, lower, images, views: int, augment, batch_size: int, desc: str | None = None) -> list[np.ndarray]:
    """The frozen part of `model` run once per view: [un-augmented, augmented 1..views], each float16 (N, ...)
    activations at the input of `lower`'s output boundary, through one compiled inference call
    (backend.inference_function). A bar per view named after `desc` (progress.bar)."""
    import keras

    inp = keras.Input(model.input_shape[1:], name="image")
    run = backend.inference_function(keras.Model(inp, lower(models.before_backbone(model)(inp)), name="frozen_lower"))
    out = []
    for v in range(views + 1):
        parts = []
        for start in progress.batches(len(images), batch_size, desc and f"{desc}, view {v + 1} of {views + 1}"):
            x = np.asarray(images[start : start + batch_size], dtype=np.float32)[..., None]
            if v and augment is not None:
                x = backend.to_numpy(augment(x, training=True))
            parts.append(run(x).astype(np.float16))
        out.append(np.concatenate(parts))
    return out


def tempered(proba: np.ndarray, t: float) -> np.ndarray:
    """softmax(log p / t), averaged over members when `proba` is (members, N, k): what scale_logits makes of a
    model (or an ensemble of members) whose probabilities were `proba`."""
    z = np.log(np.clip(np.asarray(proba, np.float64), 1e-12, 1.0)) / t
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    p = z / z.sum(axis=-1, keepdims=True)
    return p.mean(axis=0) if p.ndim == 3 else p


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the validation cross-entropy of softmax(log p / T) (Guo et al. 2017), of each
    member's p averaged when `proba` is (members, N, k): a log grid over [1/4, 4], then refined; 1.0 when no
    T helps."""
    rows = np.arange(len(labels))

    def nll(t):
        return float(-np.log(np.clip(tempered(proba, t)[rows, labels], 1e-300, 1.0)).mean())

    best = min(np.exp(np.linspace(np.log(0.25), np.log(4.0), 81)), key=nll)
    best = float(min(np.linspace(best / 1.04, best * 1.04, 21), key=nll))
    return best if nll(best) < nll(1.0) else 1.0


def finetune(p: dict, classes: list[str], splits: dict[str, data.Subset], base_model_path: Path, live, positive: int = 0) -> tuple[object, dict]:
    """Fine-tune the baseline from block `finetune.unfreeze_from` up (BatchNorm frozen for pretrained weights)
    with AdamW, linear warm-up then cosine decay, label smoothing, class weights and augmentation. With
    `finetune.views` > 0 the frozen lower backbone runs once per view (the un-augmented image and `views`
    augmented ones) and each epoch trains only the top blocks on the cached activations. The checkpoint is
    chosen on validation `finetune.monitor`; the baseline (epoch 0) is kept when no epoch beats it. With
    `finetune.members` > 1, that many runs (seeds seed, seed+1, ...) share the cache and the start, and their
    chosen weights are averaged into one model by a greedy soup on validation (see _greedy_soup). With
    `finetune.temperature_scaling`, the softmax is then calibrated on validation."""
    import keras

    cfg, runtime = p["finetune"], p["runtime"]
    backend.seed_everything(cfg["seed"], deterministic=not runtime["xla"])
    devices = backend.configure(runtime)
    bs = cfg["batch_size"] * devices.replicas
    tr, va = splits["train"], splits["val"]
    k = len(classes)
    aug = data.augmenter(p["train"]["augment"], cfg["seed"], cfg["views"])
    share = p["train"]["augment"]["outside_lungs"]
    if cfg["views"] and share > cfg["views"] / (cfg["views"] + 1):
        log.warning("train.augment.outside_lungs %g: with finetune.views %d one cached view in %d is the whole image, "
                    "so every augmented view is filled, %.3g of the samples", share, cfg["views"], cfg["views"] + 1,
                    cfg["views"] / (cfg["views"] + 1))
    onehot = np.eye(k, dtype=np.float32)[tr.labels]
    class_weight = class_weights(tr.labels, k, p["train"]["class_weight"])
    with devices.scope():
        model = models.load(base_model_path)
        n = models.unfreeze_from(model, cfg["unfreeze_from"], freeze_batchnorm=models.pretrained(p["model"]))
    log.info("fine-tuning %d backbone layers with weights, from %s up", n, cfg["unfreeze_from"])
    t0 = time.perf_counter()
    if cfg["views"]:
        lower, top = models.split_backbone(model, cfg["unfreeze_from"])
        train_views = cache_views(model, lower, tr.images, cfg["views"], aug, bs, "caching train")
        val_x = cache_views(model, lower, va.images, 0, None, bs, "caching val")[0].astype(np.float32)
        with devices.scope():
            trained = models.top_model(model, top)
        log.info("cached %d views of %d training images and %d validation images, %s each, in %.1fs",
                 cfg["views"] + 1, len(tr), len(va), tuple(top.input.shape[1:]), time.perf_counter() - t0)
    else:
        with devices.scope():
            trained, on_host = _augmentation(model, aug, runtime)
        val_x = data.batches(va.images, None, bs, multiple_of=devices.replicas)
    cache_s = time.perf_counter() - t0
    steps_per_epoch = int(np.ceil(len(tr) / bs))
    total = cfg["epochs"] * steps_per_epoch
    warmup = min(cfg["warmup_epochs"] * steps_per_epoch, total - 1)
    start = trained.get_weights()
    runs, t1 = [], time.perf_counter()
    for member in range(cfg["members"]):
        seed = cfg["seed"] + member
        if member:
            backend.seed_everything(seed, deterministic=not runtime["xla"])
            trained.set_weights(start)
        if cfg["views"]:
            fit_data = {"x": _view_batches(train_views, onehot, _sample_weights(tr.labels, class_weight), bs, seed, devices.replicas,
                                           cfg["mixup"])}
        else:
            # the dataset shuffles itself (seeded); Keras' own shuffle does not apply to one
            fit_data = {"x": data.batches(tr.images, onehot, bs, shuffle=True, seed=seed, multiple_of=devices.replicas,
                                          sample_weights=_sample_weights(tr.labels, class_weight), augment=on_host), "shuffle": False}
        schedule = keras.optimizers.schedules.CosineDecay(0.0, decay_steps=max(1, total - warmup),
                                                          warmup_target=cfg["learning_rate"], warmup_steps=warmup)
        averaging = {"use_ema": True, "ema_momentum": ema_momentum(cfg["ema_epochs"], steps_per_epoch)} if cfg["ema_epochs"] else {}
        trained.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=cfg["weight_decay"], **averaging),
                        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg["label_smoothing"]),
                        **backend.compile_kwargs(runtime))
        # select: last runs every epoch (the schedule's end is kept); the Selector still scores each one for the curves
        patience = cfg["patience"] if cfg["select"] == "best" else cfg["epochs"] + 1
        selector = Selector(lambda: _predict(trained, val_x, bs, devices.replicas), va.labels, positive,
                            cfg["monitor"], cfg["monitor_specificity"], patience, class_weight=class_weight)
        callbacks = [selector.callback(trained)] + ([backend.live_callback(live)] if member == 0 else [])
        callbacks.append(progress_callback(cfg["epochs"], f"member {member + 1} of {cfg['members']}" if cfg["members"] > 1 else "fine-tuning",
                                           "epoch", ("loss", "val_loss", f"val_{cfg['monitor']}")))
        trained.fit(**fit_data, epochs=cfg["epochs"], callbacks=callbacks, verbose=0)
        if cfg["select"] == "best":
            runs.append((selector.restore(trained), trained.get_weights(), selector))
        else:
            with averaged_weights(trained):  # with finetune.ema_epochs, the average is what was scored
                runs.append((selector.last(), trained.get_weights(), selector))
        if cfg["members"] > 1:
            log.info("member %d (seed %d): epoch %d of %d, validation %s %.4f", member, seed, runs[-1][0]["best_epoch"],
                     runs[-1][0]["epochs_run"], cfg["monitor"], runs[-1][0][f"val_{cfg['monitor']}"])
    seconds = time.perf_counter() - t1
    predict_val = lambda: _predict(trained, val_x, bs, devices.replicas).astype(np.float64)  # noqa: E731
    if cfg["select"] == "best":
        summary = runs[0][0] if len(runs) == 1 else _greedy_soup(trained, runs, predict_val)
        val_proba = predict_val()
    else:
        summary, val_proba = _combine_last(trained, runs, predict_val, start)
        if summary["ensemble"]["members"] > 1:
            with devices.scope():
                model = models.ensemble(model, cfg["unfreeze_from"], len(runs), lambda i: trained.set_weights(runs[i][1]))
    summary.update(trainable_layers=n, cache_seconds=cache_s, seconds_per_epoch=seconds / max(1, summary["epochs_run"]))
    if cfg["temperature_scaling"]:
        t = fit_temperature(val_proba, va.labels)
        models.scale_logits(model, t)
        before, after = tempered(val_proba, 1.0), tempered(val_proba, t)
        summary["temperature"] = {"value": round(t, 4),
                                  "val_ece_before": round(metrics.expected_calibration_error(va.labels, before), 4),
                                  "val_ece_after": round(metrics.expected_calibration_error(va.labels, after), 4)}
        log.info("temperature scaling on validation: T=%.3f, ECE %.4f -> %.4f", t,
                 summary["temperature"]["val_ece_before"], summary["temperature"]["val_ece_after"])
    return model, summary


def run_stage(stage: str) -> None:
    """The train or finetune stage: params -> model file + sidecar, dvclive curves and summary. dvclive writes
    into a temporary folder that replaces reports/<stage>/ (with its markdown report, report.md) only when the
    stage succeeds."""
    from dvclive import Live

    from . import params

    t0 = time.perf_counter()
    p = params.load()
    out = paths.BASELINE if stage == "train" else paths.FINETUNED
    atomic.remove_stale(paths.REPORTS / stage, out, paths.sidecar(out, "info"))  # left by a killed run
    ds = params.dataset(p)
    classes = ds["classes"]
    splits = data.load_splits(classes, only=("train", "val"), masks=False)
    with atomic.atomic_dir(paths.REPORTS / stage) as tmp:
        live = Live(dir=str(tmp), dvcyaml=False, save_dvc_exp=False, report=None)
        if stage == "train":
            model, summary = baseline(p, classes, splits, live, classes.index(ds["positive"]))
        else:
            model, summary = finetune(p, classes, splits, paths.BASELINE, live, classes.index(ds["positive"]))
        save(model, out, model_info(p, classes, ds["positive"]))
        timing = {k: round(summary.pop(k), 2) for k in list(summary) if "seconds" in k}
        kept = kept_in_words(summary)
        live.summary["epochs_run"] = summary.pop("epochs_run")
        live.summary["best"] = {"epoch": summary.pop("best_epoch"), **summary}
        live.summary["seconds"] = timing
        live.make_summary()
        # dvclive's markdown report (report.md, its curves in static/), drawn once: per epoch it costs ~0.5 s
        Live(dir=str(tmp), resume=True, dvcyaml=False, save_dvc_exp=False, report="md").make_report()
    log.info("%s: kept %s; validation %s; %s; stage %.1fs", stage, kept,
             {k[4:]: v for k, v in summary.items() if k.startswith("val_")}, timing, time.perf_counter() - t0)


def kept_in_words(summary: dict) -> str:
    """What a train or finetune summary says was kept, in words (the stage's last log line)."""
    epoch, epochs_run = summary["best_epoch"], summary["epochs_run"]
    if "ensemble" in summary:
        n, of = summary["ensemble"]["members"], summary["ensemble"]["of"]
        if summary["start_kept"]:
            runs = f"the ensemble of {of} runs" if of > 1 else "the run"
            return f"the starting weights ({runs} did not beat them)"
        if n > 1:
            return f"the ensemble of {n} runs' final weights (epoch {epoch} each, {epochs_run} in all)"
        return f"the final weights, epoch {epoch}"
    if "soup" in summary:
        return f"a weight soup of the best epochs of {summary['soup']['members']} of {summary['soup']['of']} runs ({epochs_run} epochs in all)"
    return f"epoch {epoch} of {epochs_run}" if epoch else f"the starting weights (none of {epochs_run} epochs beat them)"
