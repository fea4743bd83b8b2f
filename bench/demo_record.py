"""Record a finished ``tbps demo`` run: its results.md into bench/RESULTS.md, its results.json beside it.

Usage: python bench/demo_record.py RUN_DIR [--name demo]

The demo measures itself (``RUN_DIR/results.json``: every number, the command, the wall time and
the load); this script only copies what it wrote, so the section says nothing the run did not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_section  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the demo's --out directory")
    parser.add_argument("--name", default="demo", help="the section of bench/RESULTS.md (and bench/NAME-results.json)")
    args = parser.parse_args()
    record = json.loads((args.run / "results.json").read_text())
    markdown = (args.run / "results.md").read_text()
    copy = Path(__file__).resolve().parent / f"{args.name}-results.json"
    shutil.copyfile(args.run / "results.json", copy)
    head = (
        f"## tbps demo: `{record['command']}`\n\n"
        f"{record['seconds'] / 60:.1f} min wall, {record.get('jobs', 1)} training jobs at a time on {record.get('cpu_count')} cores; "
        f"load average {record['load']['start_1min']:.1f} at the start, {record['load']['end_1min']:.1f} at the end; "
        f"git commit {record.get('git_commit')}. The whole record: [`bench/{copy.name}`]({copy.name}).\n\n"
    )
    path = write_section(args.name, head + markdown.split("\n", 1)[1] if markdown.startswith("# ") else head + markdown)
    print(f"wrote section {args.name} of {path} and {copy}")


if __name__ == "__main__":
    main()
