"""Image files: finding them, decoding one, and decoding many in worker processes that may crash.

One function (decode) turns any file the pipeline meets into the pixels every model sees, and one process
pool (decode_many) runs it over many files, surviving a worker that crashes.

Convention: 8-bit grayscale (0 = black, 255 = white), square `size` x `size`, EXIF orientation applied.
`clean` stores these pixels; `predict` calls the same function, so training and prediction cannot disagree.
Both decode through decode_many, so a file that kills its decoding process costs only that file.
"""
from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import os
import re
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger("images")


class DecodeError(Exception):
    """An image that cannot be used. `reason` is a short machine-readable drop reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # raised in a worker process, re-raised in the parent
        return DecodeError, (self.reason, self.detail)


def _to_gray(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> uint8 grayscale array."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float data: stretch the image's own range to 8 bits (Pillow's convert('L') would clip).
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            return np.zeros(arr.shape, np.uint8)
        return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
    if img.mode in ("LA", "RGBA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels become black, the colour of an X-ray's background.
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    return np.asarray(img.convert("L"), dtype=np.uint8)


def square(gray: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Make a grayscale array square (pad: letterbox with black, keeping all anatomy; crop: centre crop)
    and resize it to size x size with one filter for every image."""
    h, w = gray.shape
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        gray = gray[top : top + s, left : left + s]
    elif h != w:
        s = max(h, w)
        canvas = np.zeros((s, s), np.uint8)
        top, left = (s - h) // 2, (s - w) // 2
        canvas[top : top + h, left : left + w] = gray
        gray = canvas
    img = Image.fromarray(gray, mode="L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(img, dtype=np.uint8)


# The raster formats radiographs come in; Pillow would otherwise also open e.g. EPS (run through Ghostscript),
# PDF-like and exotic formats whatever a file's name says.
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP")  # JPEG includes multi-picture (MPO) files
DEFAULT_MAX_PIXELS = 60_000_000  # the default of params.yaml clean.max_pixels and predict's --max-pixels
DEFAULT_MAX_ASPECT_RATIO = 4.0   # chest radiographs are at most ~1:2.3 in both collections
DEFAULT_MIN_SIDE = 1


def limit_name(key: str, style: str = "clean") -> str:
    """How the user sets a decoding limit: `clean.max_pixels` in params.yaml, or `--max-pixels` on the command line."""
    return f"clean.{key}" if style == "clean" else "--" + key.replace("_", "-")


def check_size(w: int, h: int, max_pixels: int, max_aspect_ratio: float, min_side: int, style: str = "clean") -> None:
    """Refuse, from the header alone, images too large, too small or too elongated to be worth decoding.
    Bounds the work: padding an image to a square costs (long side)^2, at most max_pixels * max_aspect_ratio."""
    if w <= 0 or h <= 0:
        raise DecodeError("unreadable", f"image is {w}x{h} pixels")
    if w * h > max_pixels:
        raise DecodeError("decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds {limit_name('max_pixels', style)}={max_pixels}")
    if min(w, h) < min_side:
        raise DecodeError("too_small", f"{w}x{h} pixels: shorter side under {limit_name('min_side', style)}={min_side}")
    if max(w, h) > max_aspect_ratio * min(w, h):
        raise DecodeError("extreme_aspect_ratio", f"{w}x{h} pixels: aspect ratio {max(w, h) / min(w, h):.4g}:1 exceeds "
                                                  f"{limit_name('max_aspect_ratio', style)}={max_aspect_ratio:g}")


def _bomb_detail(err: Exception, max_pixels: int, style: str) -> str:
    """Pillow's own guard fires above its limit (and errors at twice it): say it in our words, with our limit."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{found.group(1)} pixels" if found else "image size"
    return f"{size} exceeds {limit_name('max_pixels', style)}={max_pixels}"


def decode(path: str | Path, size: int, mode: str = "pad", max_pixels: int = DEFAULT_MAX_PIXELS, *,
           max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, min_side: int = DEFAULT_MIN_SIDE,
           style: str = "clean") -> np.ndarray:
    """Decode an image file to uint8 (size, size) grayscale. Raises DecodeError with a drop reason.
    Size limits are checked on the header, before any pixel is decoded; `style` names them in messages
    as params (`clean.max_pixels`) or as command-line options (`--max-pixels`)."""
    path = Path(path)
    try:
        nbytes = path.stat().st_size
    except OSError as err:
        raise DecodeError("unreadable", err.strerror or str(err)) from None
    if nbytes == 0:
        raise DecodeError("empty_file", "zero bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own guard, at the same limit (process-wide, set per call)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, formats=FORMATS) as img:
                check_size(*img.size, max_pixels, max_aspect_ratio, min_side, style)
                img = ImageOps.exif_transpose(img)
                img.load()
                gray = _to_gray(img)
        except DecodeError:
            raise
        except UnidentifiedImageError:
            raise DecodeError("not_an_image", "not a PNG, JPEG, BMP, TIFF, GIF or WebP image") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DecodeError("decompression_bomb", _bomb_detail(err, max_pixels, style)) from None
        except MemoryError:
            raise DecodeError("unreadable", "out of memory while decoding") from None
        except (OSError, ValueError, SyntaxError, EOFError) as err:
            raise DecodeError("unreadable", " ".join((str(err) or type(err).__name__).split())) from None
    if gray.size == 0:
        raise DecodeError("unreadable", "image has no pixels")
    return square(gray, size, mode)


# --- many files, in worker processes

def find_images(args: Iterable[str | os.PathLike]) -> list[Path]:
    """The files to decode, sorted and without duplicates. A folder contributes every file below it whose
    suffix is an image suffix (sources.IMAGE_SUFFIXES, case-insensitive), skipping hidden files and folders
    (names starting with '.', e.g. macOS `._x.png` metadata); a file named explicitly is always taken,
    whatever its suffix. A path that does not exist is a UserError; so is finding no file at all."""
    from .errors import UserError
    from .sources import IMAGE_SUFFIXES

    suffixes = tuple(sorted(IMAGE_SUFFIXES))
    found: set[Path] = set()
    for arg in args:
        p = Path(arg)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    if not name.startswith(".") and name.lower().endswith(suffixes):
                        found.add(Path(root) / name)
        elif p.exists():
            found.add(p)
        else:
            raise UserError(f"{arg}: no such file or folder")
    if not found:
        raise UserError(f"no image files found in {', '.join(map(str, args)) or 'the arguments'} "
                        f"(looked for {' '.join(suffixes)})")
    return sorted(found)


CRASHED = DecodeError("decoder_crashed", "the decoding process died on this file (corrupt file or out of memory)")


class Item(NamedTuple):
    """One job, decoded: `value` is what the decoding function returned, or `error` says why there is none."""
    index: int
    job: object
    value: object | None
    error: DecodeError | None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _call(fn: Callable, job) -> tuple[object | None, DecodeError | None]:
    try:
        return fn(job), None
    except DecodeError as err:
        return None, err
    except Exception as err:  # a decoder bug on one odd file must not stop the others
        return None, DecodeError("unreadable", _one_line(f"{type(err).__name__}: {err}"))


def _call_chunk(fn: Callable, jobs: list) -> list[tuple[object | None, DecodeError | None]]:
    return [_call(fn, job) for job in jobs]


def resolve_workers(workers: int) -> int:
    """A worker count, 0 meaning all cores."""
    return workers if workers > 0 else (os.cpu_count() or 1)


SERIAL_BELOW = 64  # fewer files are decoded in this process: starting workers would cost more


def workers_for(n: int, workers: int) -> int:
    """Worker processes for decoding `n` files (`workers`: a param, 0 = all cores): 1 below SERIAL_BELOW."""
    return 1 if n < SERIAL_BELOW else resolve_workers(workers)


class decode_many:
    """Run `fn(job)` (a decode: returns a value or raises DecodeError) over `jobs`, yielding Items in input order.

    With more than one worker the jobs run in worker processes (forkserver: safe after TensorFlow has
    started threads), in chunks, at most `ahead` jobs ahead of the consumer: memory stays bounded and the
    workers keep decoding while the consumer works. Decoding starts at construction, so a caller can load a
    model meanwhile. Any other exception from `fn` is an `unreadable` error for that job. A worker that dies
    (a decoder crash, out of memory) costs only the job that killed it: the unfinished jobs are retried one
    by one and that job gets the `decoder_crashed` error (CRASHED). `fn` and the jobs must pickle (a
    module-level function or a functools.partial of one). Use as an iterator; close() (or `with`) stops the
    workers early. As with any non-fork multiprocessing, a script that calls this must guard its entry point
    with `if __name__ == "__main__":` (`python -m cxr` and `python -m stages.<name>` do)."""

    def __init__(self, fn: Callable, jobs: Iterable, workers: int = 0, *, ahead: int = 64, chunk: int = 4):
        self.fn = fn
        self.jobs = list(jobs)
        self.workers = min(resolve_workers(workers), max(1, len(self.jobs)))
        self.chunk = max(1, chunk)
        self.inflight = max(2 * self.workers, math.ceil(max(1, ahead) / self.chunk))
        self.chunks = [list(range(i, min(i + self.chunk, len(self.jobs)))) for i in range(0, len(self.jobs), self.chunk)]
        self.pool: ProcessPoolExecutor | None = None
        self.pending: collections.deque = collections.deque()  # (indices, future)
        self.next_chunk = 0
        self.ready: collections.deque[Item] = collections.deque()
        self.serial_next = 0
        if self.workers > 1:
            self.pool = self._new_pool(self.workers)
            self._fill()

    # --- process pool
    def _new_pool(self, n: int) -> ProcessPoolExecutor:
        if "forkserver" in multiprocessing.get_all_start_methods():
            ctx = multiprocessing.get_context("forkserver")
            module = getattr(self.fn, "func", self.fn).__module__
            ctx.set_forkserver_preload(["__main__", __name__, module])  # workers start with their imports done
        else:
            ctx = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(max_workers=n, mp_context=ctx)

    def _submit(self, pool: ProcessPoolExecutor, indices: list[int]):
        return pool.submit(_call_chunk, self.fn, [self.jobs[i] for i in indices])

    def _fill(self) -> None:
        while self.next_chunk < len(self.chunks) and len(self.pending) < self.inflight:
            idx = self.chunks[self.next_chunk]
            self.pending.append((idx, self._submit(self.pool, idx)))
            self.next_chunk += 1

    def _isolate(self, indices: list[int]) -> None:
        """After a worker died: run these jobs one at a time in a fresh single worker; a job whose worker
        dies again is the culprit."""
        pool = self._new_pool(1)
        try:
            for i in indices:
                try:
                    (value, error), = self._submit(pool, [i]).result()
                except BrokenProcessPool:
                    value, error = None, CRASHED
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = self._new_pool(1)
                self.ready.append(Item(i, self.jobs[i], value, error))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # --- iterator
    def __iter__(self) -> Iterator[Item]:
        return self

    def __next__(self) -> Item:
        if self.ready:
            return self.ready.popleft()
        if self.pool is None:  # serial
            if self.serial_next >= len(self.jobs):
                raise StopIteration
            i = self.serial_next
            self.serial_next += 1
            return Item(i, self.jobs[i], *_call(self.fn, self.jobs[i]))
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
        self.ready.extend(Item(i, self.jobs[i], value, err) for i, (value, err) in zip(indices, results))
        return self.ready.popleft()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None
            self.pending.clear()
        self.serial_next = len(self.jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
