"""`ekfac-influence` (also `python -m ekfac_influence`): parse, then call the library."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ekfac-influence", description=(
        "Which training sequences made this language model produce this completion? "
        "EK-FAC influence functions (Grosse et al., 2023)."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small LM on Python's documentation and explain its completions")
    demo.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace a finished demo run in --out")
    demo.add_argument("--quick", action="store_true", help="a much smaller model and corpus (for tests)")
    demo.add_argument("--top", type=int, default=5, help="sequences shown per query (default: 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .storage import StorageError

    try:
        if args.command == "demo":
            from .demo import DemoConfig, run_demo

            run_demo(args.out, config=DemoConfig.quick() if args.quick else DemoConfig(), overwrite=args.overwrite, top=args.top)
    except (ConfigError, StorageError, FileNotFoundError, ValueError) as error:
        print(f"ekfac-influence {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
