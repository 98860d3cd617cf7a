"""The clean stage's logic: decode, drop (with reasons), deduplicate and shard the raw records.

Every record is decoded in parallel (images.decode_many: a file that crashes its worker is one drop), what
cannot be used is dropped with its reason, exact and near duplicates are removed, and the kept pixels are
stored in a few shard files."""
from __future__ import annotations

import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image

from . import images, paths, progress
from .sources import Drop, Record

log = logging.getLogger("clean")

# 16x16 DCT perceptual hash (256 bits). On chest X-rays the common 64-bit hash is too coarse: different
# patients' radiographs are often within 6-10 bits, while at 256 bits the nearest unrelated image is
# typically 60+ bits away and re-encoded copies stay within ~10.
HASH_SIZE = 16


@dataclass
class Decoded:
    record: Record
    pixels: np.ndarray | None = None
    mask: np.ndarray | None = None
    lungs: np.ndarray | None = None
    sha256: str = ""
    phash: str = ""   # perceptual hash, hex (HASH_BITS bits)
    error: Drop | None = None


def decode_record(raw: str, size: int, mode: str, lim: dict, rec: Record, decode=images.decode) -> tuple:
    """One record's (pixels, lesion mask or None, lung mask or None, sha256, perceptual hash); DecodeError if it
    cannot be used (a mask that cannot be decoded included). Masks go through the same decode and resize as the
    image, so they stay aligned with it. Runs in a decoding worker."""
    path = Path(raw) / rec.file
    pixels = decode(path, size, mode, **lim)
    mask, lungs = (_decode_mask(Path(raw), m, what, size, mode, lim, decode) if m else None
                   for m, what in ((rec.mask, "lesion mask"), (rec.lungs, "lung mask")))
    try:
        with open(path, "rb") as f:  # in chunks: a large file never sits in memory whole
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as err:
        raise images.DecodeError("unreadable", err.strerror or str(err)) from None
    phash = str(imagehash.phash(Image.fromarray(pixels), hash_size=HASH_SIZE))
    return pixels, mask, lungs, digest, phash


def _decode_mask(raw: Path, name: str, what: str, size: int, mode: str, lim: dict, decode) -> np.ndarray:
    try:
        return decode(raw / name, size, mode, **lim) >= 128
    except images.DecodeError as err:
        raise images.DecodeError(err.reason, f"its {what} {name}: {err.detail}") from None


def limits(cfg: dict) -> dict:
    """The decoding limits of the `clean` params (images' defaults for keys a caller leaves out)."""
    return {"max_pixels": cfg.get("max_pixels", images.DEFAULT_MAX_PIXELS),
            "max_aspect_ratio": cfg.get("max_aspect_ratio", images.DEFAULT_MAX_ASPECT_RATIO),
            "min_side": cfg.get("min_side", images.DEFAULT_MIN_SIDE)}


def decode_all(raw: Path, records: list[Record], size: int, mode: str, max_pixels: int | dict, workers: int,
               *, decode=images.decode) -> list[Decoded]:
    """Decode every record, in parallel over `workers` processes (0 = all cores), in input order, with
    images.decode_many: a file that crashes its worker is dropped as `decoder_crashed`, the others go on.
    `max_pixels`: that limit alone, or a dict of images.decode's limits (see limits()). `decode`: images.decode,
    or a stand-in with its signature (a module-level function, so that workers can load it)."""
    workers = images.workers_for(len(records), workers)
    lim = max_pixels if isinstance(max_pixels, dict) else {"max_pixels": max_pixels}
    fn = functools.partial(decode_record, str(raw), size, mode, lim, decode=decode)
    chunk = max(1, min(64, len(records) // (4 * workers)))
    out = []
    with images.decode_many(fn, records, workers, ahead=8 * workers * chunk, chunk=chunk) as items:
        for it in progress.bar(items, len(records), "decoding"):
            if it.error is not None:
                out.append(Decoded(it.job, error=Drop(it.job.file, it.error.reason, it.error.detail)))
            else:
                out.append(Decoded(it.job, *it.value))
    return out


def hash_words(hexes) -> np.ndarray:
    """Hex perceptual hashes -> (n, words) uint64 array."""
    hexes = list(hexes)
    if not hexes:
        return np.zeros((0, 1), np.uint64)
    return np.array([[int(h[i : i + 16], 16) for i in range(0, len(h), 16)] for h in hexes], dtype=np.uint64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between two sets of hashes given as (n, words) uint64 (len(a) x len(b))."""
    a, b = np.atleast_2d(a.T).T, np.atleast_2d(b.T).T
    return sum(np.bitwise_count(a[:, None, w] ^ b[None, :, w]).astype(np.int16) for w in range(a.shape[1]))


def close_pairs(hashes: np.ndarray, max_distance: int, block: int = 1024):
    """Yield (i, j, d) for i < j with Hamming distance d <= max_distance, in blocks to bound memory."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    if max_distance < 0 or len(hashes) == 0:
        return
    for start in range(0, len(hashes), block):
        d = hamming(hashes[start : start + block], hashes)
        ii, jj = np.nonzero(d <= max_distance)
        for i, j in zip(ii + start, jj):
            if i < j:
                yield int(i), int(j), int(d[i - start, j])


class UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def _dedupe_clusters(items: list[Decoded], clusters: list[list[int]], reason: str, why) -> tuple[set[int], list[Drop]]:
    """Keep the first member (by file name) of each cluster; drop the others, or all where labels conflict."""
    dropped, drops = set(), []
    for members in clusters:
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda i: items[i].record.file)
        labels = {items[i].record.label for i in members}
        keep = members[0]
        for i in members if len(labels) > 1 else members[1:]:
            dropped.add(i)
            other = items[keep if i != keep else members[1]].record.file
            if other == items[i].record.file:  # one file named by two records (e.g. two metadata rows)
                conflict = f", with labels {sorted(labels)}" if len(labels) > 1 else ""
                drops.append(Drop(items[i].record.file, "listed_twice", f"the dataset's metadata names this file more than once{conflict}"))
            elif len(labels) > 1:
                drops.append(Drop(items[i].record.file, "conflicting_labels", f"same image as {other} with labels {sorted(labels)}"))
            else:
                drops.append(Drop(items[i].record.file, reason, why(i, keep)))
    return dropped, drops


def deduplicate(items: list[Decoded], near_distance: int) -> tuple[list[Decoded], list[Drop]]:
    """Drop exact duplicates (same file bytes), then near-duplicates (perceptual-hash distance <= near_distance)."""
    by_hash: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_hash.setdefault(it.sha256, []).append(i)
    gone, drops = _dedupe_clusters(items, list(by_hash.values()), "exact_duplicate", lambda i, k: f"same bytes as {items[k].record.file}")
    rest = [i for i in range(len(items)) if i not in gone]
    uf = UnionFind(len(rest))
    hashes = hash_words(items[i].phash for i in rest)
    for a, b, _ in close_pairs(hashes, near_distance):
        uf.union(a, b)
    clusters = [[rest[m] for m in ms] for ms in uf.groups().values()]
    gone2, drops2 = _dedupe_clusters(
        items, clusters, "near_duplicate",
        lambda i, k: f"perceptual-hash distance {int(hamming(hash_words([items[i].phash]), hash_words([items[k].phash]))[0, 0])} to {items[k].record.file}",
    )
    kept = [items[i] for i in rest if i not in gone2]
    return kept, drops + drops2


def write_shards(kept: list[Decoded], out: Path, shard_size: int) -> pd.DataFrame:
    """Pixels in `images-NNNNN.npy` (uint8, N x S x S), lesion masks (`masks-NNNNN.npy`) and lung masks
    (`lungs-NNNNN.npy`, bool) alongside where any record has one (all False for those without); returns the
    manifest."""
    rows = []
    kinds = [kind for kind in paths.MASK_SHARDS if any(getattr(it, kind) is not None for it in kept)]
    for s, start in enumerate(range(0, len(kept), shard_size)):
        chunk = kept[start : start + shard_size]
        np.save(out / f"images-{s:05d}.npy", np.stack([it.pixels for it in chunk]))
        blank = np.zeros_like(chunk[0].pixels, dtype=bool)
        for kind in kinds:
            np.save(out / f"{paths.MASK_SHARDS[kind][0]}-{s:05d}.npy",
                    np.stack([getattr(it, kind) if getattr(it, kind) is not None else blank for it in chunk]))
        for k, it in enumerate(chunk):
            r = it.record
            rows.append({"file": r.file, "label": r.label, "group": r.group, "sha256": it.sha256,
                         "phash": it.phash, "shard": s, "index": k,
                         **{col: getattr(it, kind) is not None for kind, (_, col) in paths.MASK_SHARDS.items()}})
    columns = ["file", "label", "group", "sha256", "phash", "shard", "index"] + [col for _, col in paths.MASK_SHARDS.values()]
    return pd.DataFrame(rows, columns=columns)


def summarize(n_records: int, source_drops: list[Drop], stage_drops: list[Drop], manifest: pd.DataFrame, classes: list[str]) -> dict:
    """Counts that add up: seen (records + files the source layout rejects) = kept + dropped."""
    drops = source_drops + stage_drops
    reasons: dict[str, int] = {}
    for d in drops:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    out = {"seen": n_records + len(source_drops), "kept": len(manifest), "dropped": len(drops),
           "dropped_by_reason": dict(sorted(reasons.items())),
           "kept_by_class": {c: int((manifest["label"] == c).sum()) for c in classes}}
    if out["seen"] != out["kept"] + out["dropped"]:
        raise AssertionError(f"clean counts do not add up: {out}")
    return out


def run(raw: Path, out: Path, records: list[Record], source_drops: list[Drop], classes: list[str], cfg: dict,
        *, decode=images.decode) -> tuple[dict, pd.DataFrame]:
    """Decode, drop, deduplicate and write shards + manifest.csv into `out` (an empty folder).
    Returns (summary counts, dropped-files table). `decode`: as for decode_all."""
    decoded = decode_all(raw, records, cfg["image_size"], cfg["resize"], limits(cfg), cfg["workers"], decode=decode)
    failed = [d.error for d in decoded if d.error is not None]
    ok = [d for d in decoded if d.error is None]
    kept, dup_drops = deduplicate(ok, cfg["near_duplicate_distance"])
    kept.sort(key=lambda d: d.record.file)
    manifest = write_shards(kept, out, cfg["shard_size"])
    manifest.to_csv(out / "manifest.csv", index=False, lineterminator="\n")
    summary = summarize(len(records), source_drops, failed + dup_drops, manifest, classes)
    dropped = pd.DataFrame([vars(d) for d in source_drops + failed + dup_drops], columns=["file", "reason", "detail"])
    dropped = dropped.sort_values(["reason", "file"], kind="stable").reset_index(drop=True)
    return summary, dropped
