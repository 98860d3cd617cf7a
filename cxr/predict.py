"""The predict command: classify chest X-ray files with a trained model (`python -m cxr predict PATH...`).

    files and folders -> images.find_images -> images.decode_many (the model's own image_size/resize, in
      worker processes, a bounded window ahead of the model) -> inference.predict_stream (batches through
      the model while the workers decode the next ones; optional Grad-CAM overlays, gradcam.write_overlays)
      -> inference.prediction_table -> CSV

One CSV row per input file, sorted by path (EPILOG: the columns). A file that cannot be decoded gets an error
row (`reason: detail`, as cxr.images.DecodeError names it) and the others are still predicted. Exit code 0: all predicted; 1: some file failed; 2: usage error (one line, no traceback, found
before any image is decoded: inputs, model and sidecars, a place to write --out); 3: internal error (a bug).

This module parses the arguments and checks where outputs go; the work is done by the library. Nothing
here imports TensorFlow at module level: `--help` and usage errors stay light.
"""
from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

from . import atomic, gradcam, images, inference, modelinfo, paths, progress
from .errors import UserError, cli
from .sources import IMAGE_SUFFIXES

log = logging.getLogger("predict")

DEFAULT_OUT = "predictions.csv"


def check_writable(path: Path, option: str) -> None:
    """Fail now, not after every image is predicted, if nothing can be written at `path` (a file or folder to be)."""
    import tempfile

    path = Path(path)
    folder = path.parent if option != "--gradcam" else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{option} {path}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cxr-write-test.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{option} {path}: cannot write in {existing} ({err.strerror or err})") from None


def write_table(table, out: str) -> None:
    """CSV to `out` atomically, or to stdout for '-'. Probabilities as float32, shortest exact form."""
    if out == "-":
        table.to_csv(sys.stdout, index=False, lineterminator="\n")
        sys.stdout.flush()
    else:
        atomic.write_csv(out, table)


# --- command line ----------------------------------------------------------------------------------

def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text}")
    return value


DESCRIPTION = "Classify chest X-ray image files with a trained model; one CSV row per file."
EPILOG = f"""\
One row per image file, sorted by path (folders expanded; a file given twice is
predicted once), whatever the order of the arguments. Columns:
  path          the file
  argmax_class  the class with the highest probability; argmax_p its probability
  p_<class>     each class's probability (names as in the model's .info.json)
  positive_p    the probability of the positive class (e.g. COVID), which triage uses
  triage        "<positive class> suspected" or "... not suspected": positive_p at or
                above the threshold `dvc repro evaluate` chose on the validation split
                for a target sensitivity (default 0.95), saved in
                <model stem>.operating_point.json. The threshold is chosen for
                sensitivity, not where the argmax changes: an image can be "COVID
                suspected" while its argmax_class is another class, and the other
                way round.
  triage_rule   that rule in words, with the threshold
  error         empty, or `reason: detail` for a file that could not be decoded (its
                other columns are then empty)
Without the operating point file, positive_p, triage and triage_rule are empty.
Folders are searched recursively for {' '.join(sorted(IMAGE_SUFFIXES))}
files (hidden ones skipped); a file named explicitly is always tried.
Outputs (the CSV, Grad-CAM PNGs) get the usual permissions of your files (umask).
Exit status: 0 all files predicted, 1 some file failed (see its error row), 2 usage
error (one line; found before any image is decoded), 3 internal error (a bug)."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders")
    parser.add_argument("--model", default=str(paths.FINETUNED), help="trained .keras model with its .info.json sidecar (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="CSV", help="output CSV, written atomically; '-' for stdout (default: %(default)s)")
    parser.add_argument("--gradcam", metavar="DIR", type=Path, help="also write a Grad-CAM overlay PNG per predicted image into DIR")
    parser.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per model call (default: %(default)s)")
    parser.add_argument("--workers", type=_int_at_least(0), default=0, help="decoding processes; 0 = all cores (default: %(default)s)")
    parser.add_argument("--max-pixels", type=_int_at_least(1), default=images.DEFAULT_MAX_PIXELS,
                        help="larger images are refused as decompression bombs (default: %(default)s, as clean.max_pixels)")
    parser.add_argument("--max-aspect-ratio", type=_ratio, default=images.DEFAULT_MAX_ASPECT_RATIO,
                        help="more elongated images are refused (default: %(default)s, as clean.max_aspect_ratio)")
    return parser


def parser(prog: str = "python -m cxr predict") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


@cli
def run(args: argparse.Namespace) -> int:
    """The predict command on parsed arguments; returns the exit status (0 all predicted, 1 some failed)."""
    t0 = time.perf_counter()
    files = images.find_images(args.inputs)
    model_path = Path(args.model)
    info = modelinfo.read_info(model_path)
    classes = list(info["classes"])
    op = modelinfo.read_operating_point(model_path, classes)
    if args.out != "-" and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a CSV file name (or '-' for stdout)")
    if args.out != "-":
        check_writable(Path(args.out), "--out")
    if args.gradcam is not None:
        if args.gradcam.exists() and not args.gradcam.is_dir():
            raise UserError(f"--gradcam {args.gradcam} is a file; give a folder")
        check_writable(args.gradcam, "--gradcam")
        names = gradcam.overlay_names(files)
    decode = functools.partial(images.decode, size=int(info["image_size"]), mode=info["resize"], max_pixels=args.max_pixels,
                               max_aspect_ratio=args.max_aspect_ratio, style="cli")
    # Decoding starts now, in worker processes, while Keras loads the model.
    with images.decode_many(decode, files, args.workers, ahead=2 * args.batch_size) as items:
        model = inference.load_model(model_path, info)
        draw = None
        if args.gradcam is not None:
            args.gradcam.mkdir(parents=True, exist_ok=True)
            explain = gradcam.explainer(model)[1]

            def draw(indices, pixels, proba):
                gradcam.write_overlays(model, pixels, proba, classes, op, [args.gradcam / names[i] for i in indices], explain=explain)

        proba, errors = inference.predict_stream(progress.bar(items, len(files), "predicting"), inference.forward(model), len(classes),
                                                 args.batch_size, on_batch=draw)
    table = inference.prediction_table([str(f) for f in files], proba, classes, op, errors=errors)
    write_table(table, args.out)
    failed = int((table["error"] != "").sum())
    log.info("%d file(s): %d predicted, %d failed, in %.1fs -> %s%s", len(table), len(table) - failed, failed,
             time.perf_counter() - t0, "stdout" if args.out == "-" else args.out,
             f"; Grad-CAM overlays in {args.gradcam}" if args.gradcam is not None else "")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cxr predict` without the word `predict`: main(["scan.png", "--out", "-"])."""
    return run(parser().parse_args(argv))
