"""``qsched families``: the supported model families and their paper defaults."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any, *, parents: list[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("families", parents=parents, help="list supported model families")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from qsched.families import list_families

    for spec in list_families():
        print(f"{spec.name:14s} {spec.default_steps} steps, guidance {spec.guidance_scale:g}: {spec.description}")
    return 0
