"""``pyqvm``: the command-line face. Parsing, output and exit codes only; the work is in the API.

pyqvm run [SPEC.toml] [options] [--template T] [-- CMD ARGS...]  boot (or clone), run CMD,
                                                                exit with its code
pyqvm cmdline SPEC.toml [--json]                   print the QEMU argv pyqvm would run
pyqvm image build [--flavour F] [--force]          build the built-in guest image
pyqvm image list | prune [--dry-run]               the built images; remove old ones
pyqvm template create [SPEC] --name T [--setup CMD]...   freeze a ready guest as template T
pyqvm template list | rm NAME...                   the templates
pyqvm doctor [--json] [--for MODE] [--fix]         what this host can run (tcg/kvm/vfio/xen)

One module per verb (``pyqvm.cli.run``, ``.cmdline``, ``.image``, ``.template``, ``.doctor``),
each with ``add_parser(subparsers, parents)`` and ``run(args) -> int``; argparse dispatches.
Exit status: the guest command's own for ``run``; 2 for a usage error; 125 when pyqvm itself
fails (like ``docker run``); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pyqvm.cli import cmdline, doctor, image, run, template
from pyqvm.cli.specargs import UsageError, spec_from_args
from pyqvm.errors import PyqvmError

EXIT_ERROR = 125  # pyqvm itself failed (like `docker run`); CMD's own codes pass through
EXIT_USAGE = 2  # argparse's own

_VERBS = (run, cmdline, image, template, doctor)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per verb module."""
    ap = argparse.ArgumentParser(
        prog="pyqvm", description="Boot QEMU guests and drive them over QMP."
    )
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    # -v also after the subcommand (`pyqvm run -v ...`); SUPPRESS keeps a top-level -v.
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more logging (-vv: debug)",
    )
    sub = ap.add_subparsers(dest="command", required=True)
    for verb in _VERBS:
        verb.add_parser(sub, parents=[verbosity])
    ap.set_defaults(parser=ap, takes_command=False, min_log_level="warning")
    return ap


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse; everything after the first ``--`` is the guest command, never an option of ours."""
    argv = list(argv)
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if cmd and not args.takes_command:
        parser.error(f"{args.command} takes no command after --")
    args.cmd = cmd
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    level = min(level, logging.getLevelName(args.min_log_level.upper()))
    logging.basicConfig(level=level, format="pyqvm: %(message)s", stream=sys.stderr)
    if args.verbose < 2:
        # qemu.qmp logs a traceback when QEMU hangs up; pyqvm's own error already says why.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        code: int = args.run(args)
        return code
    except UsageError as e:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(e))  # exits 2, with the usage line
    except PyqvmError as e:
        print(f"pyqvm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


__all__ = ["EXIT_ERROR", "EXIT_USAGE", "build_parser", "main", "parse_args", "spec_from_args"]


if __name__ == "__main__":
    sys.exit(main())
