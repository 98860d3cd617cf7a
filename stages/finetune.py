"""finetune: unfreeze the top of the backbone -> models/finetuned.keras, curves in metrics/finetune/."""
from cxr.errors import cli
from cxr.training import run_stage


@cli
def main() -> None:
    run_stage("finetune")


if __name__ == "__main__":
    main()
