"""`ekfac-influence` (also `python -m ekfac_influence`): parse, then call the stages in `run`.

    ekfac-influence demo                                   # the built-in demo, no arguments
    ekfac-influence fit    --config run.yaml [--section.key value ...]
    ekfac-influence index  --config run.yaml
    ekfac-influence query  --config run.yaml --queries.file queries.jsonl   (or --prompt ... --completion ...)
    ekfac-influence export --config run.yaml
    ekfac-influence self-influence --config run.yaml       # audit the corpus: outliers, near-duplicates
    ekfac-influence evaluate --config run.yaml            # LDS and planted-fact recall per strategy (docs/accuracy.md)
    ekfac-influence show runs/<name> [--queries.name set] [--open]   # finished results, nothing recomputed

Every `--section.key` option overrides one field of the YAML config; `--help` lists them with the
field docs. A user's mistake ends with one line on stderr and exit status 2, never a traceback.
Nothing heavy is imported before the arguments are parsed: `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .version import __version__

STAGES = {
    "fit": ("pack the corpus and fit EK-FAC factors", ("run", "model", "corpus", "fit", "factors")),
    "index": ("build the BM25 shortlist index over the packed corpus", ("run", "model", "corpus", "index")),
    "query": ("score training sequences for prompt/completion queries", ("run", "model", "queries", "query")),
    "export": ("write the review report (JSONL, CSV, HTML) of a query set", ("run", "queries", "export")),
    "self-influence": ("audit the corpus: self-influence of every training sequence, outliers, near-duplicate groups",
                       ("run", "model", "corpus", "self_influence")),
    "evaluate": ("measure accuracy: LDS against retrained models and planted-fact recall, per strategy",
                 ("run", "model", "corpus", "queries", "factors", "evaluate")),
    "demo": ("train a small LM on Python's documentation and explain its completions (no arguments needed)",
             ("run", "factors", "index", "query", "export")),
    "show": ("print the finished results of a run's query sets, or open their report; nothing is recomputed",
             ("run", "queries")),
}


class _Parser(argparse.ArgumentParser):
    """A parse error is one line on stderr (with where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def as_typed(value) -> str:
    """A default as a user would type it on the command line or in YAML: null, true, [a, b], 1e-05."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(as_typed(v) for v in value) + "]"
    if isinstance(value, str):
        return value if value else "not set"
    return str(value)


def build_parser() -> argparse.ArgumentParser:
    from .config import field_docs
    from .run_config import CHOICES, SECTIONS

    parser = _Parser(prog="ekfac-influence", description=(
        "Which training sequences made this language model produce this completion? "
        "EK-FAC influence functions (Grosse et al., 2023)."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(STAGES) + "}")
    for name, (help_text, sections) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if name == "show":
            sub.add_argument("run_dir", nargs="?", metavar="RUN", help="the run directory (or give --run / --config)")
        sub.add_argument("--config", help="YAML config file (configs/*.yaml are examples, <run>/config.<stage>.yaml "
                                          "what a run used); options below override it")
        if name == "show":
            sub.add_argument("--open", action="store_true", help="open each report in a browser (written first if missing)")
            sub.add_argument("--top", type=int, default=3, metavar="N", help="sequences shown per query (default: 3)")
        else:
            sub.add_argument("--overwrite", action="store_true", help="replace this stage's finished results")
            sub.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "fit":
            sub.add_argument("--dry-run", action="store_true", help="print the bytes per process of the model, factors "
                             "and buffers (the model built on the meta device), fit nothing")
            sub.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: processes (default: this launch's)")
            sub.add_argument("--device-memory", metavar="SIZE", help="with --dry-run: say whether it fits, e.g. 80GB")
        if name == "query":
            sub.add_argument("--prompt", help="one query's prompt (instead of queries.file); its report is written too")
            sub.add_argument("--completion", help="its completion; omitted = the model's greedy completion")
            sub.add_argument("--contrast", help="an alternative completion: explain completion rather than contrast")
        if name == "demo":
            sub.add_argument("--quick", action="store_true", help="a much smaller model and corpus (for tests)")
            sub.add_argument("--out", dest="run", default=argparse.SUPPRESS, help="the run directory (same as --run)")
        overrides = sub.add_argument_group("config overrides (--section.key value)")
        if "run" in sections:
            overrides.add_argument("--run", default=argparse.SUPPRESS, metavar="DIR", help="run directory (runs/<name>)")
        for section in sections:
            if section == "run":
                continue
            cls = SECTIONS[section]
            docs = field_docs(cls)
            for field in dataclasses.fields(cls):
                if name == "show" and field.name != "name":
                    continue
                default = field.default if field.default is not dataclasses.MISSING else None
                choices = CHOICES.get((section, field.name))
                overrides.add_argument(f"--{section}.{field.name}", dest=f"{section}.{field.name}",
                                       metavar=None if choices else "V", choices=choices, default=argparse.SUPPRESS,
                                       help=f"{docs.get(field.name, '')} (default: {as_typed(default)})".replace("%", "%%"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    from . import distributed
    from .config import ConfigError
    from .run_config import load_run_config
    from .data import DataError
    from .query_inputs import Query
    from .model import LayerSelectionError, ModelLoadError
    from .factors import FactorMismatchError
    from .storage import StorageError

    user_errors = (ConfigError, DataError, ModelLoadError, LayerSelectionError, FactorMismatchError, StorageError,
                   FileNotFoundError, ValueError)
    config = None
    try:
        if unknown:
            raise ConfigError(_unknown_options(parser, args.command, unknown))
        overrides = [(key, value) for key, value in vars(args).items() if "." in key or key == "run"]
        if getattr(args, "run_dir", None) is not None:
            if "run" in vars(args):
                raise ConfigError("give the run directory once: as RUN or as --run")
            overrides.append(("run", args.run_dir))
        config = load_run_config(args.config, overrides)
        if args.command == "demo" and args.config is None:
            from .demo import demo_run_config

            config = demo_run_config(overrides, quick=args.quick)
        if args.command == "show":
            from . import run

            names = [config.queries.name] if args.config is not None or "queries.name" in vars(args) else None
            run.show(config, names, open_report=args.open, shown=args.top)
            return 0
        show = not args.quiet and distributed.is_main()
        if not show:  # Hugging Face's own bars ("Loading weights", "Generating train split") too
            import datasets
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            datasets.disable_progress_bars()
        from . import run

        if args.command == "fit" and not args.dry_run and (args.world_size or args.device_memory):
            raise ConfigError("--world-size and --device-memory go with --dry-run")
        if args.command == "fit" and args.dry_run:
            from .plan import parse_bytes

            run.fit_dry_run(config, world=args.world_size,
                            device_memory=None if args.device_memory is None else parse_bytes(args.device_memory))
        elif args.command == "fit":
            run.fit(config, overwrite=args.overwrite, show_progress=show)
        elif args.command == "index":
            run.index(config, overwrite=args.overwrite, show_progress=show)
        elif args.command == "query":
            queries = None
            if args.prompt is not None:
                queries = [Query(args.prompt, args.completion, args.contrast, "cli")]
            elif args.completion is not None or args.contrast is not None:
                raise ConfigError("--completion and --contrast need --prompt")
            run.query(config, queries, overwrite=args.overwrite, show_progress=show, report=queries is not None)
        elif args.command == "export":
            run.export(config, overwrite=args.overwrite)
        elif args.command == "self-influence":
            run.self_influence(config, overwrite=args.overwrite, show_progress=show)
        elif args.command == "evaluate":
            run.evaluate(config, overwrite=args.overwrite, show_progress=show)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(config, quick=args.quick, overwrite=args.overwrite, show_progress=show)
    except user_errors as error:
        if distributed.is_main():
            print(f"ekfac-influence {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except OSError as error:  # a full or read-only disk, a path under a file
        if distributed.is_main():
            import errno

            where = error.filename or (config.run if config is not None else "the run directory")
            full = error.errno in (errno.ENOSPC, errno.EDQUOT)
            if full and "free" not in str(error.strerror):  # a write that failed midway: say what is left
                from .files import free_space, size_text

                where = f"{where}; {size_text(free_space(where))} free"
            advice = {errno.ENOSPC: "free some space or choose another --run", errno.EROFS: "choose a writable --run",
                      errno.EDQUOT: "free some space within your quota or choose another --run",
                      errno.EACCES: "choose a writable --run", errno.ENOTDIR: "a part of the path is a file: choose "
                                                                             "another --run"}
            print(f"ekfac-influence {args.command}: error: {error.strerror or error} ({where}); "
                  f"{advice.get(error.errno, 'check the path and the disk, or choose another --run')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ekfac-influence {args.command}: interrupted; finished stages are kept, rerun to go on", file=sys.stderr)
        return 130
    return 0


def _unknown_options(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """One line naming the first unknown option, with the closest known one."""
    import difflib

    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices[command]
    known = [option for action in sub._actions for option in action.option_strings]
    option = next((u.split("=")[0] for u in unknown if u.startswith("-")), unknown[0])
    close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f"; see ekfac-influence {command} --help"
    return f"unknown option {option}{hint}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
