"""finetune: unfreeze the top of the backbone -> models/finetuned.keras, curves in reports/finetune/."""
from cxr import quiet

quiet.tensorflow()  # first: TensorFlow reads its log level once, when the imports below load it
from cxr.errors import cli  # noqa: E402
from cxr.training import run_stage  # noqa: E402


@cli
def main() -> None:
    run_stage("finetune")


if __name__ == "__main__":
    main()
