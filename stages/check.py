"""check: what the run needs from outside the project, before any stage works: the dataset (its local copy under
CXR_DATA_DIR, or Kaggle) and the backbone's ImageNet weights (Keras' cache, or their download); every missing one
is named in one error. It writes nothing and no stage depends on it, so `dvc repro` and `dvc exp run` run it
first, `dvc repro <stage>` leaves it out, and it reruns only when the params it reads change (see dvc.yaml)."""
from cxr import needs
from cxr.errors import cli


@cli
def main() -> None:
    needs.check_params()


if __name__ == "__main__":
    main()
