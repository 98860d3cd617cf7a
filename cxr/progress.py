"""Progress bars on the long steps, for a person watching: drawn on stderr when it is a terminal, nothing at
all otherwise (CI, a log file, output captured by a test), so captured output never holds bar characters.

bar() wraps tqdm; batches() is range(0, n, batch_size) counting images as each batch is done. A bar appears
only once its step has run for DELAY seconds, so short steps stay silent even on a terminal."""
from __future__ import annotations

import sys
from typing import Iterable, Iterator

DELAY = 1.0  # seconds before a bar is drawn


def interactive(stream=None) -> bool:
    """Whether `stream` (default: sys.stderr, looked up now) is a terminal; False for a replaced stream
    without isatty, or a closed one."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def bar(iterable: Iterable | None = None, total: int | None = None, desc: str | None = None, unit: str = "image"):
    """A tqdm bar on stderr, or, when stderr is not a terminal or `desc` is None (a step inside another
    step's bar), a disabled one: it iterates `iterable` unchanged and its update() does nothing."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=desc is None or not interactive(),
                leave=False, delay=DELAY, dynamic_ncols=True)


def batches(n: int, batch_size: int, desc: str | None) -> Iterator[int]:
    """The start of each batch of `n` items, range(0, n, batch_size), with a bar counting items."""
    with bar(total=n, desc=desc) as shown:
        for start in range(0, n, batch_size):
            yield start
            shown.update(min(batch_size, n - start))
