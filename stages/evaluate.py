"""evaluate stage: reads params and runs evaluation.run (metrics, plots, operating points, test predictions).

Baseline and fine-tuned model on the test split -> metrics/evaluate/*.json, plots/evaluate/, and the
triage threshold beside each model (models/<name>.operating_point.json) for `predict`."""
from cxr import quiet

quiet.tensorflow()  # first: TensorFlow reads its log level once, when the imports below load it
from cxr import evaluation, params  # noqa: E402
from cxr.errors import cli  # noqa: E402


@cli
def main() -> None:
    p = params.load()
    ds = params.dataset(p)
    evaluation.run(ds["classes"], ds["positive"], p["evaluate"])


if __name__ == "__main__":
    main()
