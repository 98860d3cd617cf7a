"""train: the frozen-backbone baseline -> models/baseline.keras, per-epoch curves in metrics/train/."""
from cxr.errors import cli
from cxr.training import run_stage


@cli
def main() -> None:
    run_stage("train")


if __name__ == "__main__":
    main()
