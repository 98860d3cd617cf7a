"""predict: classify new chest X-ray files with a trained model (`python -m cxr predict PATH...`).

    files and folders -> collect_inputs (sorted; folders recursively, image suffixes only)
      -> decode_many    (cxr.images.decode with the model's own image_size/resize, in worker processes,
                         in input order, a bounded window ahead of the model)
      -> predict_table  (batches through the model while the workers decode the next ones;
                         optional Grad-CAM overlays) -> CSV

One CSV row per input file: path, prediction, p_<class> per class, triage, error. A file that cannot be
decoded gets an error row (`reason: detail`, as cxr.images.DecodeError names it) and the others are still
predicted. Exit code 0: all predicted; 1: some file failed; 2: usage error (one line, no traceback, found
before any image is decoded: inputs, model and sidecars, a place to write --out); 3: internal error (a bug).

Nothing here imports TensorFlow at module level: `--help`, usage errors and the decoding workers stay light.
"""
from __future__ import annotations

import argparse
import collections
import functools
import logging
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from . import atomic, images, paths
from .errors import UserError, cli

log = logging.getLogger("predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")
DEFAULT_OUT = "predictions.csv"
DEFAULT_MAX_PIXELS = images.DEFAULT_MAX_PIXELS              # the same defaults as clean's params
DEFAULT_MAX_ASPECT_RATIO = images.DEFAULT_MAX_ASPECT_RATIO
GRADCAM_ALPHA = 0.4                  # heatmap opacity, as params.yaml gradcam.alpha


# --- inputs ----------------------------------------------------------------------------------------

def collect_inputs(args: Iterable[str | os.PathLike]) -> list[Path]:
    """The files to predict, sorted and without duplicates. A folder contributes every file below it whose
    suffix is an image suffix (case-insensitive), skipping hidden files and folders (names starting with
    '.', e.g. macOS `._x.png` metadata); a file named explicitly is always taken, whatever its suffix.
    A path that does not exist is a UserError; so is finding no file at all."""
    found: set[Path] = set()
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                        found.add(Path(root) / name)
        elif p.exists():
            found.add(p)
        else:
            raise UserError(f"{arg}: no such file or folder")
    if not found:
        raise UserError(f"no image files found in {', '.join(map(str, args)) or 'the arguments'} "
                        f"(looked for {' '.join(IMAGE_SUFFIXES)})")
    return sorted(found)


# --- decoding --------------------------------------------------------------------------------------

class Item(NamedTuple):
    """One input file, decoded: pixels uint8 (S, S), or error `reason: detail`."""
    index: int
    path: Path
    pixels: np.ndarray | None
    error: str | None


Decoder = Callable[[Path, int, str, int], np.ndarray]


def decode_image(path: Path, size: int, mode: str, max_pixels: int, max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> np.ndarray:
    """cxr.images.decode, its limits named as this command's options (`--max-pixels`) in error rows."""
    return images.decode(path, size, mode, max_pixels, max_aspect_ratio=max_aspect_ratio, style="cli")


def _decode_one(decoder: Decoder, path: Path, size: int, mode: str, max_pixels: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return decoder(path, size, mode, max_pixels), None
    except images.DecodeError as err:
        return None, _one_line(f"{err.reason}: {err.detail}")
    except Exception as err:  # a decoder bug on one odd file must not stop the others
        return None, _one_line(f"unreadable: {type(err).__name__}: {err}")


def _decode_chunk(job) -> list[tuple[np.ndarray | None, str | None]]:
    decoder, files, size, mode, max_pixels = job
    return [_decode_one(decoder, f, size, mode, max_pixels) for f in files]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def resolve_workers(workers: int) -> int:
    return workers if workers > 0 else (os.cpu_count() or 1)


class decode_many:
    """Decode `files` with cxr.images.decode, yielding Items in input order.

    With more than one worker the files are decoded in worker processes (forkserver: safe after TensorFlow
    has started threads), in chunks, at most `ahead` files ahead of the consumer: memory stays bounded and
    the workers keep decoding while the consumer runs the model. Decoding starts at construction, so a
    caller can load the model meanwhile. A worker that dies (a decoder crash, out of memory) costs only
    the file that killed it: the unfinished files are retried one by one and that file gets a
    `decoder_crashed` error. Use as an iterator; close() (or `with`) stops the workers early.
    As with any non-fork multiprocessing, a script that calls this must guard its entry point with
    `if __name__ == "__main__":` (`python -m cxr` does)."""

    def __init__(self, files: Iterable[Path], size: int, mode: str = "pad", max_pixels: int = DEFAULT_MAX_PIXELS,
                 workers: int = 0, *, ahead: int = 64, chunk: int = 4, decoder: Decoder | None = None):
        self.files = [Path(f) for f in files]
        self.args = (size, mode, max_pixels)
        self.decoder = decoder or decode_image
        self.workers = min(resolve_workers(workers), max(1, len(self.files)))
        self.chunk = max(1, chunk)
        self.inflight = max(2 * self.workers, math.ceil(max(1, ahead) / self.chunk))
        self.chunks = [list(range(i, min(i + self.chunk, len(self.files)))) for i in range(0, len(self.files), self.chunk)]
        self.pool: ProcessPoolExecutor | None = None
        self.pending: collections.deque = collections.deque()  # (indices, future)
        self.next_chunk = 0
        self.ready: collections.deque[Item] = collections.deque()
        self.serial_next = 0
        if self.workers > 1:
            self.pool = self._new_pool(self.workers)
            self._fill()

    # --- process pool
    @staticmethod
    def _new_pool(n: int) -> ProcessPoolExecutor:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["__main__", "cxr.predict"])  # workers start with numpy and Pillow loaded
        else:
            ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=n, mp_context=ctx)

    def _job(self, indices: list[int]):
        return (self.decoder, [self.files[i] for i in indices], *self.args)

    def _fill(self) -> None:
        while self.next_chunk < len(self.chunks) and len(self.pending) < self.inflight:
            idx = self.chunks[self.next_chunk]
            self.pending.append((idx, self.pool.submit(_decode_chunk, self._job(idx))))
            self.next_chunk += 1

    def _isolate(self, indices: list[int]) -> None:
        """After a worker died: decode these files one at a time in a fresh single worker; a file whose
        worker dies again is the culprit."""
        pool = self._new_pool(1)
        try:
            for i in indices:
                try:
                    (pixels, error), = pool.submit(_decode_chunk, self._job([i])).result()
                except BrokenProcessPool:
                    pixels, error = None, "decoder_crashed: the decoding process died on this file (corrupt file or out of memory)"
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._new_pool(1)
                self.ready.append(Item(i, self.files[i], pixels, error))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- iterator
    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        if self.ready:
            return self.ready.popleft()
        if self.pool is None:  # serial
            if self.serial_next >= len(self.files):
                raise StopIteration
            i = self.serial_next
            self.serial_next += 1
            return Item(i, self.files[i], *_decode_one(self.decoder, self.files[i], *self.args))
        if not self.pending:
            self.close()
            raise StopIteration
        indices, future = self.pending.popleft()
        try:
            results = future.result()
        except BrokenProcessPool:
            unfinished = indices + [i for idx, _ in self.pending for i in idx]
            self.pending.clear()
            self.pool.shutdown(wait=False, cancel_futures=True)
            log.warning("a decoding worker died: retrying %d file(s) one at a time", len(unfinished))
            self._isolate(unfinished)
            self.pool = self._new_pool(self.workers)
            self._fill()
            return self.__next__()
        self._fill()
        self.ready.extend(Item(i, self.files[i], px, err) for i, (px, err) in zip(indices, results))
        return self.ready.popleft()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
            self.pending.clear()
        self.serial_next = len(self.files)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# --- model, sidecars -------------------------------------------------------------------------------

def check_model_file(model_path: Path) -> None:
    """A model file that exists and is one: a .keras archive (a zip), or a legacy HDF5 .h5 file."""
    import zipfile

    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model file {model_path} not found (run `dvc repro` or `dvc pull`, or pass --model)")
    if model_path.suffix.lower() == ".h5":
        with open(model_path, "rb") as f:
            ok = f.read(8) == b"\x89HDF\r\n\x1a\n"
    else:
        ok = zipfile.is_zipfile(model_path)
    if not ok:
        raise UserError(f"{model_path} is not a Keras model file (a .keras archive, as train and finetune write)")


def _sidecar_error(side: Path, what: str) -> UserError:
    return UserError(f"{side}: {what}; restore it with its model (`dvc pull`) or rerun the stage that wrote it")


def read_model_info(model_path: Path) -> dict:
    """The model's `.info.json` sidecar (classes, positive, image_size, resize), checked; UserError if unusable."""
    import json

    model_path = Path(model_path)
    check_model_file(model_path)
    side = paths.sidecar(model_path, "info")
    if not side.is_file():  # as cxr.training.read_info, without importing TensorFlow
        raise UserError(f"{side} not found: the model's class names and image size are stored there by train/finetune")
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _sidecar_error(side, f"not a valid model info file ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict):
        raise _sidecar_error(side, "not a JSON object")
    classes, size, resize = info.get("classes"), info.get("image_size"), info.get("resize")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c.strip() for c in classes) \
            or len(set(classes)) != len(classes):
        raise _sidecar_error(side, f"classes must be a list of two or more distinct names, got {classes!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise _sidecar_error(side, f"image_size must be an integer in [1, 4096], got {size!r}")
    if resize not in ("pad", "crop"):
        raise _sidecar_error(side, f"resize must be pad or crop, got {resize!r}")
    if "positive" in info and info["positive"] not in classes:
        raise _sidecar_error(side, f"positive {info['positive']!r} is not one of its classes {classes}")
    return info


def read_operating_point(model_path: Path, classes: list[str]) -> dict | None:
    """The triage threshold saved by evaluate (`<stem>.operating_point.json`), checked, or None (with one warning)."""
    import json

    p = paths.sidecar(Path(model_path), "operating_point")
    if not p.is_file():
        log.warning("%s not found (written by `dvc repro evaluate`): the triage column stays empty", p)
        return None
    try:
        op = json.loads(p.read_text(encoding="utf-8"))
        op = {"class": op["class"], "threshold": op["threshold"], "by": op.get("by"), "target": op.get("target")}
    except Exception as err:
        raise UserError(f"{p} is not a valid operating point file ({type(err).__name__}: {err})") from None
    t = op["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1:
        raise _sidecar_error(p, f"threshold must be a probability in [0, 1], got {t!r}")
    op["threshold"] = float(t)
    if not isinstance(op["class"], str) or op["class"] not in classes:
        raise UserError(f"{p} is for class {op['class']!r}, not one of the model's classes {classes}: rerun `dvc repro evaluate`")
    return op


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


def load_model(model_path: Path, info: dict):
    """models.load, and a check that the model matches its sidecar."""
    from . import models

    model = models.load(model_path)
    n, size = len(info["classes"]), int(info["image_size"])
    if model.output_shape[-1] != n or tuple(model.input_shape[1:3]) != (size, size):
        raise UserError(f"{model_path} (input {model.input_shape[1:3]}, {model.output_shape[-1]} outputs) does not match its "
                        f"info sidecar ({size}x{size}, {n} classes): retrain or restore both files together")
    return model


def forward(model) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (B, S, S) images -> float32 (B, classes) probabilities: the model's inference call
    (`model(x, training=False)`, the step model.predict runs), traced once for any batch size (the
    predict function of model.predict_on_batch retraces for a last, smaller batch: seconds per shape)."""
    import tensorflow as tf

    spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])

    def run(batch: np.ndarray) -> np.ndarray:
        x = tf.convert_to_tensor(np.asarray(batch, dtype=np.float32)[..., None])
        return np.asarray(fn(x), dtype=np.float32)

    return run


def columns(classes: list[str]) -> list[str]:
    return ["path", "prediction", *[f"p_{c}" for c in classes], "triage", "error"]


def triage_labels(cls: str) -> tuple[str, str]:
    return f"{cls}-positive", f"{cls}-negative"


# --- Grad-CAM files ----------------------------------------------------------------------------------

def gradcam_names(files: list[Path]) -> list[str]:
    """One PNG file name per input, named after it: `<stem>.png`; files sharing a stem get their folders
    (relative to the inputs' common folder) joined with '__' (`a__x.png`, `b__x.png`), plus the original
    suffix where that still collides (`x_jpg.png`), plus `-<n>` as a last resort."""
    def safe(s: str) -> str:
        return "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in s).strip() or "image"

    stems = collections.Counter(f.stem for f in files)
    try:
        common = Path(os.path.commonpath([str(f.parent.absolute()) for f in files])) if files else Path()
    except ValueError:  # different drives
        common = None
    names = []
    for f in files:
        if stems[f.stem] == 1:
            names.append(safe(f.stem))
            continue
        parent = f.parent.absolute()
        rel = parent.relative_to(common).parts if common is not None and parent.is_relative_to(common) else parent.parts[1:]
        names.append(safe("__".join([*rel, f.stem])))
    counts = collections.Counter(n.lower() for n in names)  # case-insensitive: macOS and Windows disks
    names = [safe(f"{n}_{f.suffix.lstrip('.')}") if counts[n.lower()] > 1 and f.suffix else n for n, f in zip(names, files)]
    counts = collections.Counter(n.lower() for n in names)
    taken = {n.lower() for n in names if counts[n.lower()] == 1}
    out = []
    for n in names:
        if counts[n.lower()] > 1:
            k = 1
            while f"{n}-{k}".lower() in taken:
                k += 1
            n = f"{n}-{k}"
            taken.add(n.lower())
        out.append(f"{n}.png")
    return out


def write_gradcam_png(path: Path, image: np.ndarray, cam: np.ndarray, title: str, alpha: float = GRADCAM_ALPHA) -> None:
    """The X-ray with its Grad-CAM overlay, upscaled to at least 256 px, under a title bar; written atomically."""
    from PIL import Image, ImageDraw, ImageFont

    from . import gradcam

    rgb = Image.fromarray(gradcam.overlay(image, cam, alpha), "RGB")
    side = max(256, rgb.width)
    rgb = rgb.resize((side, side), Image.Resampling.BILINEAR) if rgb.width != side else rgb
    try:
        font = ImageFont.load_default(size=max(12, side // 20))
    except TypeError:  # Pillow without FreeType
        font = ImageFont.load_default()
    bar = font.getbbox("Ag")[3] + 10
    canvas = Image.new("RGB", (side, side + bar), "white")
    canvas.paste(rgb, (0, bar))
    ImageDraw.Draw(canvas).text((5, 5), title, fill="black", font=font)
    with atomic.atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")


# --- prediction ------------------------------------------------------------------------------------

def _batches(items: Iterable[Item], batch_size: int) -> Iterator[tuple[list[Item], list[Item]]]:
    """(failed items, decoded items) groups with up to batch_size decoded images each, in input order."""
    bad, good = [], []
    for item in items:
        (good if item.error is None else bad).append(item)
        if len(good) == batch_size:
            yield bad, good
            bad, good = [], []
    if bad or good:
        yield bad, good


def predict_table(model, items: Iterable[Item], classes: list[str], operating_point: dict | None = None, *,
                  batch_size: int = 32, gradcam_dir: Path | None = None, names: list[str] | None = None,
                  forward_fn: Callable[[np.ndarray], np.ndarray] | None = None):
    """Predict decoded Items (from decode_many) in batches of batch_size; returns the CSV table (pandas
    DataFrame, input order, columns()). Each batch runs through forward(model), the inference step of
    model.predict; while it runs, decode_many's workers decode the next files. With gradcam_dir,
    writes the Grad-CAM overlay of the predicted class for each predicted image as gradcam_dir/names[index]
    (default: gradcam_names of the items' paths, which needs the items as a list). forward_fn: forward(model),
    to reuse its trace across calls."""
    import pandas as pd

    rows: dict[int, dict] = {}
    if gradcam_dir is not None and names is None:
        items = list(items)
        names = gradcam_names([it.path for it in items])
    neg_pos = None
    if operating_point is not None:
        pos_index = classes.index(operating_point["class"])
        neg_pos = triage_labels(operating_point["class"])
    predict = forward_fn or forward(model)
    empty = {"prediction": "", **{f"p_{c}": np.nan for c in classes}, "triage": ""}
    for bad, good in _batches(items, batch_size):
        for it in bad:
            rows[it.index] = {"path": str(it.path), **empty, "error": it.error}
        if not good:
            continue
        x = np.stack([it.pixels for it in good])
        proba = predict(x)
        pred = proba.argmax(axis=1)
        finite = np.isfinite(proba).all(axis=1)
        for k, it in enumerate(good):
            if not finite[k]:  # a broken model: never a triage decision on NaN
                rows[it.index] = {"path": str(it.path), **empty, "error": "non_finite_output: the model returned NaN or infinite probabilities"}
                continue
            row = {"path": str(it.path), "prediction": classes[pred[k]]}
            row.update({f"p_{c}": proba[k, j] for j, c in enumerate(classes)})
            row["triage"] = "" if neg_pos is None else neg_pos[0] if proba[k, pos_index] >= operating_point["threshold"] else neg_pos[1]
            row["error"] = ""
            rows[it.index] = row
        if gradcam_dir is not None:
            from . import gradcam

            cams, _ = gradcam.heatmaps(model, x, pred.astype(np.int32), batch_size=len(x))
            for k, it in enumerate(good):
                if not finite[k]:
                    continue
                title = f"{classes[pred[k]]} p={proba[k, pred[k]]:.3f}"
                if neg_pos is not None:
                    title += f"  ({rows[it.index]['triage']})"
                write_gradcam_png(Path(gradcam_dir) / names[it.index], it.pixels, cams[k], title)
    table = pd.DataFrame([rows[i] for i in sorted(rows)], columns=columns(classes))
    for c in classes:
        table[f"p_{c}"] = table[f"p_{c}"].astype(np.float32)
    return table


def write_table(table, out: str) -> None:
    """CSV to `out` atomically, or to stdout for '-'. Probabilities as float32, shortest exact form."""
    if out == "-":
        table.to_csv(sys.stdout, index=False, lineterminator="\n")
        sys.stdout.flush()
    else:
        atomic.write_csv(out, table)


# --- command line ----------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 1:
        raise argparse.ArgumentTypeError(f"must be a number >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


DESCRIPTION = "Classify chest X-ray image files with a trained model; one CSV row per file."
EPILOG = f"""\
CSV columns: path, prediction, p_<class> (one per class, named as in the model's
.info.json), triage, error.
  triage  <positive class>-positive or -negative, at the threshold `dvc repro evaluate`
          saved in <model stem>.operating_point.json (empty if that file is missing)
  error   empty, or `reason: detail` for a file that could not be decoded
          (its prediction and probabilities are then empty)
Folders are searched recursively for {' '.join(IMAGE_SUFFIXES)}
files (hidden ones skipped); a file named explicitly is always tried.
Exit status: 0 all files predicted, 1 some file failed (see its error row), 2 usage
error (one line; found before any image is decoded), 3 internal error (a bug)."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("inputs", nargs="+", metavar="PATH", help="image files and/or folders")
    parser.add_argument("--model", default=str(paths.FINETUNED), help="trained .keras model with its .info.json sidecar (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="CSV", help="output CSV, written atomically; '-' for stdout (default: %(default)s)")
    parser.add_argument("--gradcam", metavar="DIR", type=Path, help="also write a Grad-CAM overlay PNG per predicted image into DIR")
    parser.add_argument("--batch-size", type=_positive_int, default=32, help="images per model call (default: %(default)s)")
    parser.add_argument("--workers", type=_non_negative_int, default=0, help="decoding processes; 0 = all cores (default: %(default)s)")
    parser.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                        help="larger images are refused as decompression bombs (default: %(default)s, as clean.max_pixels)")
    parser.add_argument("--max-aspect-ratio", type=_ratio, default=DEFAULT_MAX_ASPECT_RATIO,
                        help="more elongated images are refused (default: %(default)s, as clean.max_aspect_ratio)")
    return parser


def parser(prog: str = "python -m cxr predict") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                                 formatter_class=argparse.RawDescriptionHelpFormatter))


@cli
def run(args: argparse.Namespace) -> int:
    """The predict command on parsed arguments; returns the exit status (0 all predicted, 1 some failed)."""
    t0 = time.perf_counter()
    files = collect_inputs(args.inputs)
    model_path = Path(args.model)
    info = read_model_info(model_path)
    classes = list(info["classes"])
    op = read_operating_point(model_path, classes)
    if args.out != "-" and Path(args.out).is_dir():
        raise UserError(f"--out {args.out} is a folder; give a CSV file name (or '-' for stdout)")
    if args.out != "-":
        check_writable(Path(args.out), "--out")
    names = None
    if args.gradcam is not None:
        if args.gradcam.exists() and not args.gradcam.is_dir():
            raise UserError(f"--gradcam {args.gradcam} is a file; give a folder")
        check_writable(args.gradcam, "--gradcam")
        names = gradcam_names(files)
    # Decoding starts now, in worker processes, while TensorFlow loads the model.
    decoder = functools.partial(decode_image, max_aspect_ratio=args.max_aspect_ratio)
    with decode_many(files, int(info["image_size"]), info["resize"], args.max_pixels, args.workers,
                     ahead=2 * args.batch_size, decoder=decoder) as items:
        model = load_model(model_path, info)
        if args.gradcam is not None:
            args.gradcam.mkdir(parents=True, exist_ok=True)
        table = predict_table(model, items, classes, op, batch_size=args.batch_size,
                              gradcam_dir=args.gradcam, names=names)
    write_table(table, args.out)
    failed = int((table["error"] != "").sum())
    log.info("%d file(s): %d predicted, %d failed, in %.1fs -> %s%s", len(table), len(table) - failed, failed,
             time.perf_counter() - t0, "stdout" if args.out == "-" else args.out,
             f"; Grad-CAM overlays in {args.gradcam}" if args.gradcam is not None else "")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """`python -m cxr predict` without the word `predict`: main(["scan.png", "--out", "-"])."""
    return run(parser().parse_args(argv))
