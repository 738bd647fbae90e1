"""The `qwen35-ray` command line."""

import argparse
import logging
import sys
from pathlib import Path


def _make_tiny(args: argparse.Namespace) -> int:
    from qwen35_ray.model.tiny.checkpoint import write_tiny

    out = write_tiny(Path(args.dir), dense=args.dense)
    print(f"wrote {'qwen35-tiny-dense' if args.dense else 'qwen35-tiny'} to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen35-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("make-tiny", help="write the embedded tiny Qwen3.5 checkpoint to DIR")
    tiny.add_argument("dir", help="output directory (created if missing)")
    tiny.add_argument("--dense", action="store_true", help="the dense variant (no MoE)")
    tiny.set_defaults(func=_make_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
