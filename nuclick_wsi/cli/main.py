"""The ``nuclick-wsi`` command line: thin Click commands over the Python API, one module per command group."""

from __future__ import annotations

import click

from nuclick_wsi import __version__
from nuclick_wsi.cli.batch import batch, manifest_cmd
from nuclick_wsi.cli.evaluate import evaluate
from nuclick_wsi.cli.export import export_training_cmd
from nuclick_wsi.cli.propose import propose
from nuclick_wsi.cli.qupath import qupath
from nuclick_wsi.cli.report import report_cmd
from nuclick_wsi.cli.segment import segment
from nuclick_wsi.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nuclick-wsi")
def main() -> None:
    """NuClick on whole-slide images: clicks in QuPath/ASAP -> nucleus outlines."""


for command in (segment, propose, train, export_training_cmd, evaluate, qupath, batch, manifest_cmd, report_cmd):
    main.add_command(command)


if __name__ == "__main__":  # pragma: no cover
    main()
