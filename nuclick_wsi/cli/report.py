"""``nuclick-wsi report``: rebuild the QC pages of an output folder from what is there (no model is run)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from nuclick_wsi.cli.common import fail_cleanly
from nuclick_wsi.errors import NuclickError


@click.command("report")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--stem", "stems", multiple=True, metavar="STEM", help="Only this slide (repeatable).")
@fail_cleanly
def report_cmd(out_dir, stems) -> None:
    """Rebuild S.qc.html, S.review.geojson and index.html in OUT_DIR from existing outputs (no model is run)."""
    from nuclick_wsi.qc import rebuild

    written, failures = rebuild(out_dir, list(stems) or None, log=lambda line: click.echo(line, err=True))
    if not written and not failures:
        raise NuclickError(f"{out_dir}: no S.report.json here (outputs of nuclick-wsi segment)")
    for line in failures:
        click.echo(f"  FAILED {line}", err=True)
    click.echo(f"{len(written)} file(s) written in {out_dir}", err=True)
    if failures:
        sys.exit(1)
