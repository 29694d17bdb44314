"""The `pas` command line: one subcommand per stage, each a thin call into the library."""
from __future__ import annotations

import argparse
import json
import sys

from pas.errors import PasError


def _info(args) -> int:
    from pas.report import network_info
    print(json.dumps(network_info(args.name, resolution=args.resolution, num_classes=args.num_classes,
                                  in_channels=args.in_channels)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pas", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="MACs, params and per-layer widths of a registered network")
    info.add_argument("name")
    info.add_argument("--resolution", type=int, default=224)
    info.add_argument("--num-classes", type=int, default=1000)
    info.add_argument("--in-channels", type=int, default=3)
    info.set_defaults(func=_info)

    from pas import datacheck, evidence, latency, latency_table, plots, segmentation, stages, tables
    stages.add_subcommands(sub)
    plots.add_samples_subcommand(sub)
    segmentation.add_subcommand(sub)
    latency.add_subcommand(sub)
    latency_table.add_subcommand(sub)
    datacheck.add_subcommand(sub)
    tables.add_subcommand(sub)
    plots.add_subcommand(sub)
    evidence.add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv)  # a stage re-runs itself under torchrun with these arguments
    try:
        return args.func(args)
    except PasError as e:
        if args.debug:
            raise
        print(f"pas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pas: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
