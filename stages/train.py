"""train: the frozen-backbone baseline -> models/baseline.keras, per-epoch curves in reports/train/."""
from cxr import quiet

quiet.tensorflow()  # first: TensorFlow reads its log level once, when the imports below load it
from cxr.errors import cli  # noqa: E402
from cxr.training import run_stage  # noqa: E402


@cli
def main() -> None:
    run_stage("train")


if __name__ == "__main__":
    main()
