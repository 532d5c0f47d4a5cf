"""``pyqvm``: the command-line face. Parsing, output and exit codes only; the work is in the API.

pyqvm run [SPEC.toml] [options] [--template T] [-- CMD ARGS...]  boot (or clone), run CMD,
                                                                exit with its code
pyqvm cmdline SPEC.toml [--json]                   print the QEMU argv pyqvm would run
pyqvm image build [--flavour F] [--arch A] [--force]  build the built-in guest image
pyqvm image list | prune [--dry-run]               the built images; remove old ones
pyqvm image export NAME|DIR -o FILE                one verified file of an image
pyqvm image import FILE [--digest D]               check one and install it
pyqvm template create [SPEC] --name T [--setup CMD]...   freeze a ready guest as template T
pyqvm template list | rm NAME...                   the templates
pyqvm doctor [--json] [--for MODE] [--fix]         what this host can run (tcg/kvm/vfio/xen)

Named VMs, which live on after the command that started them (see docs/cli.md):
pyqvm up [SPEC.toml] [options] [--template T] --name NAME    start one; prints NAME when ready
pyqvm ps [--json]                                  list them (dead ones are removed)
pyqvm exec NAME [-n] [--env K=V] -- CMD            run CMD in it (its exit status)
pyqvm ssh NAME [--print] [-- CMD]                  ssh into it (--ssh), no prompts
pyqvm console NAME                                 its serial console (Ctrl-] detaches)
pyqvm logs NAME [--follow]                         its console log
pyqvm expect NAME PATTERN... [--fail-on P]; pyqvm send NAME TEXT [--line]   script its console
pyqvm vnc NAME [--tcp HOST:PORT]                   its screen to a VNC viewer (a unix socket)
pyqvm gdb NAME [--vmlinux F] [-x CMD] [--batch]    the host's gdb on its gdbstub (--gdb)
pyqvm qmp NAME COMMAND [JSON-ARGS]                 a QMP command; prints QEMU's answer
pyqvm snapshot NAME save|load|list|delete [TAG]    internal snapshots
pyqvm hotplug NAME disk PATH|nic|cpu|memory SIZE; pyqvm unplug NAME ID
pyqvm save NAME DIR; pyqvm restore DIR --name NAME  to a directory and back
pyqvm migrate NAME --to NAME2 [--storage copied|shared]   live-migrate into a new named VM
pyqvm stop NAME... [--force] [--timeout S] | --all; pyqvm wait NAME
pyqvm --host ssh://[USER@]HOST[:PORT] VERB ...     the same against another host's named VMs

One module per verb or family of verbs (``pyqvm.cli.run``, ``.up`` (up, restore), ``.ps``,
``.exec_cmd``, ``.ssh``, ``.console`` (console, logs), ``.gdb``, ``.control`` (the one-call
verbs on a named VM), ``.cmdline``, ``.image``, ``.template``, ``.doctor``), each with
``add_parser(subparsers, parents)``; argparse dispatches to the function a parser names.
Heavy modules (asyncio, qemu.qmp, the VM machinery) are imported inside those functions,
so ``pyqvm ps`` pays only for what it uses. Exit status (`pyqvm.cli.status`): the guest
command's own for ``run`` and ``exec`` (128+N for signal N, 126/127 when it cannot run); 2
for a usage error; 125 when pyqvm itself fails (like ``docker run``); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from pyqvm.cli import (
    cmdline,
    console,
    control,
    dial,
    doctor,
    exec_cmd,
    gdb,
    image,
    ps,
    run,
    ssh,
    template,
    up,
)
from pyqvm.cli.specargs import UsageError, spec_from_args
from pyqvm.cli.status import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE
from pyqvm.errors import PyqvmError

_VERBS = (
    run, up, ps, exec_cmd, ssh, console, gdb, control, cmdline, image, template, doctor, dial,
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per verb module."""
    ap = argparse.ArgumentParser(
        prog="pyqvm", description="Boot QEMU guests and drive them over QMP."
    )
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    ap.add_argument(
        "-H",
        "--host",
        default=os.environ.get("PYQVM_HOST") or None,
        metavar="ssh://[USER@]HOST[:PORT]",
        help="drive the named VMs of another host, over SSH (default: $PYQVM_HOST); "
        "see docs/cli.md",
    )
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
    for verb_parser in sub.choices.values():
        verb_parser.set_defaults(parser=verb_parser)  # a usage error shows the verb's usage
    # The far side of --host (pyqvm.cli.dial) is no verb a user types: not in the usage.
    sub.metavar = "{" + ",".join(v for v in sub.choices if v not in dial.VERBS) + "}"
    ap.set_defaults(parser=ap, takes_command=False, min_log_level="warning", over_owner=False)
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
    # A first use builds the image it needs: say so, in a few lines, whatever the verb.
    logging.getLogger("pyqvm.image").setLevel(min(level, logging.INFO))
    if args.verbose < 2:
        # qemu.qmp logs a traceback when QEMU hangs up; pyqvm's own error already says why.
        logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    try:
        if args.host and not args.over_owner:
            return forward(args.host, _without_host(sys.argv[1:] if argv is None else argv))
        code: int = args.run(args)
        return code
    except UsageError as e:
        parser: argparse.ArgumentParser = args.parser
        parser.error(str(e))  # exits 2, with the usage line
    except PyqvmError as e:
        print(f"pyqvm: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `pyqvm ps --json | head`: the reader left; say nothing more (Python's advice).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _without_host(argv: Sequence[str]) -> list[str]:
    """``argv`` without the ``--host``/``-H`` option (given before the verb)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("-H", "--host"):
            skip = True
        elif arg.startswith("--host="):
            pass
        elif arg == "--" or not arg.startswith("-"):
            return out + list(argv[i:])
        else:
            out.append(arg)
    return out


def forward(url: str, argv: Sequence[str]) -> int:
    """Run ``pyqvm ARGV`` on the host ``url`` names, over SSH, with this terminal (or these
    pipes) as its stdin, stdout and stderr: what a verb that is not one call on a VM's owner
    does with ``--host`` (the spec files, disks and ports it names are that host's)."""
    import subprocess

    from pyqvm.named.ssh import Host

    host = Host.parse(url)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    code = subprocess.run(host.argv(list(argv), tty=tty), check=False).returncode
    if code == 255:  # ssh's own failure; what it said is on stderr already
        print(f"pyqvm: error: host {host.url}: ssh failed (see above); pyqvm never answers "
              f"a password prompt: check `ssh {host.hostname} true`", file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    if code == 127:
        print(f"pyqvm: error: {host.failure(127, '')}", file=sys.stderr)
        return EXIT_ERROR
    return code


__all__ = [
    "EXIT_ERROR", "EXIT_USAGE", "build_parser", "forward", "main", "parse_args", "spec_from_args",
]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
