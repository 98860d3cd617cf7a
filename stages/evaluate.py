"""evaluate: baseline and fine-tuned model on the test split -> metrics/evaluate/*.json, plots/evaluate/,
and the triage threshold beside each model (models/<name>.operating_point.json) for `predict`."""
import logging
import time

from dvclive import Live

from cxr import atomic, data, evaluation, models, params, paths, training
from cxr.errors import UserError, cli

log = logging.getLogger("evaluate")


@cli
def main() -> None:
    t0 = time.perf_counter()
    p = params.load()
    ds = params.dataset(p)
    classes, positive = ds["classes"], ds["positive"]
    splits = data.load_splits(classes)
    labels = {s: splits[s].labels for s in ("val", "test")}
    for name, path in (("baseline", paths.BASELINE), ("finetuned", paths.FINETUNED)):
        info = training.read_info(path)
        if info["classes"] != classes:
            raise UserError(f"{path} was trained on classes {info['classes']}, the data has {classes}: rerun `dvc repro`")
        model = models.load(path)
        proba = {s: evaluation.predict_proba(model, splits[s].images) for s in ("val", "test")}
        result, threshold = evaluation.evaluate(proba, labels, classes, positive, p["evaluate"])
        # Headline figures are metrics (what `dvc metrics diff` shows); counts and weighted averages go to a report.
        details = {"confusion": result["test"].pop("confusion"), "weighted": result["test"].pop("weighted"),
                   "triage": {k: result["triage"][k] for k in ("val", "test", "test_argmax")}}
        for k in ("val", "test", "test_argmax"):
            result["triage"][k] = {m: result["triage"][k][m] for m in ("sensitivity", "specificity", "ppv", "npv")}
        atomic.write_json(paths.METRICS / "evaluate" / f"{name}.json", result)
        atomic.write_json(paths.REPORTS / "evaluate" / f"{name}.json", details)
        op = p["evaluate"]["operating_point"]
        atomic.write_json(paths.sidecar(path, "operating_point"), {"class": positive, "threshold": threshold, "by": op["by"], "target": op["target"]})
        if name == "finetuned":
            atomic.write_csv(paths.TEST_PREDICTIONS, evaluation.prediction_table(splits["test"], proba["test"], classes, positive, threshold))
        live = Live(dir=str(paths.PLOTS / "evaluate" / name), dvcyaml=False, save_dvc_exp=False, report=None)
        evaluation.write_plots(live, proba["test"], labels["test"], classes, positive)
        t, key = result["triage"], positive
        log.info("%s: test balanced accuracy %.3f, macro ROC-AUC %s; %s sensitivity/specificity %s/%s at argmax, %s/%s at threshold %.4f; "
                 "val/test %s", name, result["test"]["balanced_accuracy"], result["test"]["macro"]["roc_auc"], key,
                 t["test_argmax"]["sensitivity"], t["test_argmax"]["specificity"], t["test"]["sensitivity"], t["test"]["specificity"], threshold,
                 {k: (result["positive"]["val"][k], result["positive"]["test"][k]) for k in result["positive"]["test"] if k != "ci"})
    log.info("done in %.1fs", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
