"""Build the demo data: a QuPath project with two real pyramidal slides and vessels.

    python scripts/make_demo_data.py DIR

writes ``DIR/project`` (``project.qpproj``, ``classifiers/classes.json``,
``annotations/<entryID>.geojson``, ``slides/*.ome.tif``). The slides are OME-TIFFs made
from the H&E image that ships with TIAToolbox, with vessels painted in and annotated as
``Vessel`` / ``Vessel: Invasive`` (and one ``Tumor`` region). Then run, for example:

    histosynth extract --project DIR/project --class Vessel --out DIR/dataset
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from histosynth.integration.demo.data import build_demo_project
from histosynth.integration.errors import InputError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="where to build the demo (DIR/project)")
    args = parser.parse_args()
    try:
        project = build_demo_project(args.folder / "project")
    except InputError as exc:
        print(f"make_demo_data: error: {exc}", file=sys.stderr)
        return 1
    print(f"QuPath project: {project}")
    print(
        f"next: histosynth extract --project {project.parent} --class Vessel "
        f"--out {args.folder / 'dataset'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
