"""`python -m cxr plots [REV ...]`: the pipeline's plots as one self-contained HTML page that works offline.

`dvc plots show` / `dvc plots diff` write a page that loads vega, vega-lite and vega-embed from a CDN, so on a
machine without internet every chart is blank. This command asks DVC for the same plots, filled with the
same data and drawn with the project's templates (`dvc plots diff --json`: every definition in dvc.yaml, for
the workspace or for the revisions given), draws each chart to SVG with vl-convert (Vega's own renderer,
run in-process, no browser and no network), and writes one HTML file with the SVGs and the images (the
Grad-CAM panels) inline. Nothing in the page loads anything: it opens from a USB stick on an air-gapped
machine, in any browser, with scripts off.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import mimetypes
import subprocess
import tempfile
from pathlib import Path

from . import atomic
from .errors import UserError, cli

log = logging.getLogger("plots")

DESCRIPTION = __doc__
EPILOG = """examples:
  python -m cxr plots                      # the workspace -> dvc_plots/offline.html
  python -m cxr plots HEAD main -o review  # compare revisions, as `dvc plots diff HEAD main`"""
PAGE_CSS = ("body{font-family:sans-serif;margin:24px;color:#222} h1{font-size:20px} h2{font-size:15px;margin:28px 0 6px}"
            " .plot{display:inline-block;vertical-align:top;margin:0 24px 12px 0} img{max-width:100%;height:auto}"
            " .revs{color:#666;font-size:12px}")


def dvc_plots(revs: list[str], images_dir: Path) -> dict:
    """`dvc plots diff --json` (`show` with no revisions): {plot id: [{type: vega, content: spec, ...} or
    {type: image, url: path, revisions: [...]}]}; images are written under images_dir."""
    cmd = ["dvc", "plots", "diff", *revs] if revs else ["dvc", "plots", "show"]
    try:
        proc = subprocess.run([*cmd, "--json", "-o", str(images_dir)], capture_output=True, text=True)
    except FileNotFoundError:
        raise UserError("dvc is not on PATH: activate the project's environment") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise UserError(f"`{' '.join(cmd)}` failed: {lines[-1] if lines else 'no output'}")
    out = json.loads(proc.stdout)
    for error in out.get("errors") or []:
        log.warning("dvc plots: %s", error)
    return out.get("data") or {}


def chart_svg(spec: dict) -> str:
    """One Vega-Lite chart as SVG markup, drawn by vl-convert (no browser, no network)."""
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)


def _image(path: Path) -> str:
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f'<img alt="{html.escape(path.name)}" src="data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}">'


def page(data: dict, title: str) -> str:
    """The HTML page: a section per plot id, its charts as inline SVG and its images as data URLs."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{PAGE_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for plot_id, items in data.items():
        parts.append(f'<section><h2>{html.escape(plot_id)}</h2>')
        for item in items:
            if item.get("type") == "vega":
                parts.append(f'<div class="plot chart">{chart_svg(item["content"])}</div>')
            elif item.get("type") == "image":
                revs = ", ".join(item.get("revisions") or [])
                parts.append(f'<div class="plot"><div class="revs">{html.escape(revs)}</div>{_image(Path(item["url"]))}</div>')
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build(revs: list[str], out: Path) -> Path:
    """Write the offline page for `revs` (the workspace when empty) to `out` (a folder: out/offline.html)."""
    with tempfile.TemporaryDirectory(prefix="cxr-plots-") as tmp:
        data = dvc_plots(revs, Path(tmp))
        if not data:
            raise UserError("no plots: run the pipeline first (`dvc repro`)")
        title = "Plots: " + (" vs ".join(revs) if revs else "workspace")
        path = Path(out) / "offline.html"
        atomic.write_text(path, page(data, title))
    log.info("%d plots -> %s (self-contained, works offline)", len(data), path)
    return path


def add_arguments(parser):
    parser.add_argument("revs", nargs="*", metavar="REV", help="git revisions to compare (as `dvc plots diff`); none: the workspace")
    parser.add_argument("-o", "--out", type=Path, default=Path("dvc_plots"), help="folder for offline.html (default: dvc_plots)")
    return parser


@cli
def run(args) -> int:
    build(args.revs, args.out)
    return 0
