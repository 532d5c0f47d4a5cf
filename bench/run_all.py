"""Run every benchmark in bench/ and print one Markdown table: results against the issues' targets.

Each bench script ends with a line ``result: NAME pyqvm=<s> baseline=<s> ratio=<r>
[key=value ...]``. This runs them one after another, each as its own Python
(``sys.executable``) with the options below, reads that line, checks it
against the targets stated in the issues (`TARGETS`, each naming its issue)
and prints a table with the machine it ran on: CPU and cores, memory, QEMU
version, the accelerator pyqvm actually picks here, kernel, Python, date and
load average. A bench that fails (non-zero exit status, no result line,
timeout) gets a row that says so; the others still run, and the exit status is
1 at the end. Targets not met are reported, not an error.

    python bench/run_all.py [--only NAME ...] [--quick] [--markdown-out PATH] [--timeout S]

On a terminal each bench's own output streams to stderr as it runs; in a pipe
or CI only the table is printed (and a failed bench's last lines, on stderr).
Each bench gets a fresh private ``PYQVM_RUNTIME_DIR`` unless one is set, so its
named VMs stay out of your ``pyqvm ps``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
TAIL_LINES = 25  # of a failed bench's output, shown on stderr


@dataclass(frozen=True, slots=True)
class Bench:
    """One bench script and the options it runs with (full run, and ``--quick``)."""

    name: str  # as in its result line
    script: str  # file in bench/
    full: tuple[str, ...]
    quick: tuple[str, ...]
    summary: str  # pyqvm vs baseline, in a few words


# In the order they run: cheapest first, so a quick look comes back soon.
BENCHES: tuple[Bench, ...] = (
    Bench(
        "image",
        "image.py",
        ("-n", "4"),
        ("-n", "2"),
        "default image build: pyqvm's archive client vs the host's apt (warm caches)",
    ),
    Bench(
        "exec",
        "named.py",
        ("-n", "15", "--imports", "7"),
        ("-n", "5", "--imports", "3"),
        "`pyqvm exec NAME -- true` vs in-process `vm.run`",
    ),
    Bench(
        "snapshot",
        "snapshot.py",
        ("-n", "11"),
        ("-n", "3"),
        "snapshot save+load vs the same QMP by hand",
    ),
    # Boots come in pairs (one each side, the order alternating), and here every other boot
    # tends to run slow: an even count gives each side as many of those (docs/performance.md).
    Bench("boot", "boot.py", ("-n", "8"), ("-n", "4"), "boot-to-ready vs the same argv by hand"),
    Bench(
        "boot-aarch64",
        "boot.py",
        ("-n", "8", "--arch", "aarch64"),
        ("-n", "4", "--arch", "aarch64"),
        "aarch64 guest (TCG) boot-to-ready vs the same argv by hand",
    ),
    # A debian boot is 30-50 s under TCG: fewer rounds than the built-in guest's.
    Bench(
        "boot-debian",
        "boot.py",
        ("-n", "6", "--image", "debian"),
        ("-n", "2", "--image", "debian"),
        "debian flavour (systemd) boot-to-agent vs the same argv by hand",
    ),
    Bench(
        "template",
        "template.py",
        ("-n", "7"),
        ("-n", "3"),
        "clone of a template vs cold boot, to a first command",
    ),
    Bench(
        "clone",
        "clone.py",
        ("-n", "9"),
        ("-n", "3"),
        "clone of a template vs the same restore by hand, to a first command",
    ),
    # -n 16 in both modes: the target is about 16 VMs at once, and each side is one wave anyway.
    Bench(
        "scale",
        "scale.py",
        ("-n", "16"),
        ("-n", "16"),
        "16 clones vs 16 cold boots at once, until all answered",
    ),
    Bench(
        "share",
        "share.py",
        ("-n", "5"),
        ("-n", "1", "--files", "2000"),
        "10,000 small files over virtiofs (and 9p) vs the guest's own disk",
    ),
    Bench(
        "pool",
        "pool.py",
        ("-n", "20", "--suite-runs", "2"),
        ("-n", "6", "--suite-runs", "1", "--nice-rounds", "2"),
        "a VM from a warm pool vs a clone on the call; a 30-test pytest suite on each",
    ),
    # --quick runs only the case the result line is about (filled), once per tuning.
    Bench(
        "migration",
        "migration.py",
        ("--rounds", "3"),
        ("--rounds", "1", "--cases", "filled"),
        "migration of a filled 512 MiB guest, pyqvm's tuning vs QEMU's defaults",
    ),
)


@dataclass(frozen=True, slots=True)
class Target:
    """One target: what is compared, in words, and the function that decides whether it is met."""

    text: str
    met: Callable[[Mapping[str, float]], bool]
    issue: int


def at_most(key: str, limit: float, issue: int, unit: str = "") -> Target:
    """``values[key] <= limit``; a missing or NaN value is not met."""

    def met(values: Mapping[str, float]) -> bool:
        v = values.get(key)
        return v is not None and v <= limit

    return Target(f"{key} ≤ {limit}{unit}", met, issue)


TARGETS: Mapping[str, tuple[Target, ...]] = {
    # Issue 23 (bench/image.py): "Target: ratio ≤ 1.0".
    "image": (at_most("ratio", 1.0, issue=23),),
    "boot": (
        # Issue 3 (bench/boot.py, "Target: ratio ≤ 1.05"; repeated by issues 9 and 14).
        at_most("ratio", 1.05, issue=3),
        # Issue 3: defaults chosen so boot-to-ready under TCG is ≤ 2.0 s on this 2-core machine.
        at_most("pyqvm", 2.0, issue=3, unit=" s"),
    ),
    # Issue 14: "bench/boot.py --arch aarch64: pyqvm vs the same argv by hand, ratio ≤ 1.05".
    "boot-aarch64": (at_most("ratio", 1.05, issue=14),),
    # Issue 14: "bench/boot.py --image debian: ratio ≤ 1.05".
    "boot-debian": (at_most("ratio", 1.05, issue=14),),
    # Issue 4 (bench/migration.py): "ratio ≤ 0.4 on (b)", the filled guest; repeated by issue 9.
    "migration": (at_most("ratio", 0.4, issue=4),),
    # Issue 4 (bench/snapshot.py): "Target ratio ≤ 1.1"; repeated by issue 9.
    "snapshot": (at_most("ratio", 1.1, issue=4),),
    "template": (
        # Issue 10: a clone ready ≤ 0.10 s after the call, "i.e. ratio ≤ 0.05" against a cold boot.
        at_most("ratio", 0.05, issue=10),
        # Issue 10: an idle clone's PSS ≤ 15 % of an idle cold-booted VM's.
        at_most("pss_ratio", 0.15, issue=10),
    ),
    # Issue 10: "pyqvm's own work on top of the raw restore (overlays, runtime dir, clock,
    # reseed) ≤ 25 ms".
    "clone": (at_most("overhead_ms", 25.0, issue=10, unit=" ms"),),
    # Issue 10: "16 clones all answering ≤ 1.5 s in total from one loop".
    "scale": (at_most("pyqvm", 1.5, issue=10, unit=" s"),),
    "share": (
        # Issue 13: "virtiofs within 3x of the local disk and at least 5x faster than 9p on
        # the metadata-heavy part".
        at_most("ratio", 3.0, issue=13),
        Target(
            "meta_9p_over_virtiofs ≥ 5",
            lambda v: v.get("meta_9p_over_virtiofs", 0.0) >= 5.0,
            issue=13,
        ),
    ),
    "pool": (
        # Issue 26: "median ≤ 0.05 s (ratio ≤ 0.25), p95 ≤ 0.1 s; suite_ratio ≤ 0.7".
        at_most("pyqvm", 0.05, issue=26, unit=" s"),
        at_most("ratio", 0.25, issue=26),
        at_most("p95", 0.1, issue=26, unit=" s"),
        at_most("suite_ratio", 0.7, issue=26),
    ),
    # Issue 11 (bench/named.py): "the CLI round trip ≤ 0.25 s on this machine".
    "exec": (at_most("pyqvm", 0.25, issue=11, unit=" s"),),
}

RESULT = re.compile(r"^result: (?P<name>\S+)(?P<pairs>(?: \S+=\S+)*)\s*$")


@dataclass(slots=True)
class Outcome:
    """What one bench run gave: its result line's fields, or why there are none."""

    bench: Bench
    argv: list[str]
    seconds: float = 0.0
    fields: dict[str, str] = field(default_factory=dict)  # as printed, e.g. {"ratio": "0.958"}
    error: str | None = None  # set when the bench failed

    def values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self.fields.items():
            with contextlib.suppress(ValueError):  # a non-numeric extra stays text only
                out[k] = float(v)
        return out


def parse_result(lines: Sequence[str], name: str) -> dict[str, str]:
    """The key=value fields of the last ``result:`` line of ``name``.

    Raises:
        ValueError: there is none, or it lacks pyqvm/baseline/ratio.
    """
    for line in reversed(lines):
        m = RESULT.match(line.strip())
        if m is None:
            continue
        if m["name"] != name:
            raise ValueError(f"its result line is about {m['name']!r}, not {name!r}")
        fields = dict(pair.split("=", 1) for pair in m["pairs"].split())
        missing = [k for k in ("pyqvm", "baseline", "ratio") if k not in fields]
        if missing:
            raise ValueError(f"its result line lacks {', '.join(missing)}")
        return fields
    raise ValueError("no result line")


def run_bench(bench: Bench, quick: bool, timeout: float, stream: bool) -> Outcome:
    """Run one bench script to its end; never raises for the bench's own failures."""
    argv = [sys.executable, str(BENCH_DIR / bench.script), *(bench.quick if quick else bench.full)]
    outcome = Outcome(bench, argv)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    own_rundir: Path | None = None
    if "PYQVM_RUNTIME_DIR" not in env:
        own_rundir = Path(tempfile.mkdtemp(prefix="pyqvm-bench-"))  # 0700, short path
        env["PYQVM_RUNTIME_DIR"] = str(own_rundir)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    results: list[str] = []  # every line that looks like a result line

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if line.startswith("result:"):
                results.append(line)
            if stream:
                sys.stderr.write(f"  {bench.name}| {line}")
                sys.stderr.flush()

    t0 = time.monotonic()
    # Its own process group: a Ctrl-C reaches it once, from us, so its cleanup is not cut short.
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        process_group=0,
    )
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            outcome.error = f"timed out after {timeout:g} s"
            code = stop(proc)
    except KeyboardInterrupt:
        stop(proc)
        raise
    finally:
        reader.join(timeout=10)
        outcome.seconds = time.monotonic() - t0
        if own_rundir is not None:
            cleanup_rundir(own_rundir)
    if outcome.error is None and code != 0:
        outcome.error = f"exit status {code}"
    if outcome.error is None:
        try:
            outcome.fields = parse_result(results, bench.name)
        except ValueError as e:
            outcome.error = str(e)
    if outcome.error is not None and not stream:
        print(f"bench {bench.name} failed ({outcome.error}); its last lines:", file=sys.stderr)
        for line in tail:
            print(f"  {bench.name}| {line}", file=sys.stderr)
    return outcome


def stop(proc: subprocess.Popen[str]) -> int:
    """Interrupt the bench as Ctrl-C would (its ``finally`` blocks stop its VMs); kill if stuck."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def cleanup_rundir(path: Path) -> None:
    """Remove a private runtime dir, unless a named VM is still registered in it."""
    vms = path / "vms"
    left = sorted(p.name for p in vms.iterdir()) if vms.is_dir() else []
    if left:
        print(f"warning: {path} still holds named VMs {left}; left in place", file=sys.stderr)
        return
    shutil.rmtree(path, ignore_errors=True)


# --- the machine ---------------------------------------------------------------------------


def command_output(argv: Sequence[str]) -> str | None:
    try:
        res = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout


def cpu_model() -> str:
    out = command_output(["lscpu"]) or ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return "unknown CPU"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return value.strip()
    return platform.processor() or "unknown CPU"


def memory_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def qemu_version() -> str:
    out = command_output(["qemu-system-x86_64", "--version"])
    return out.splitlines()[0].strip() if out else "qemu-system-x86_64 not found"


def accelerator() -> str:
    """What pyqvm's ``accelerator = "auto"`` (every bench's default) picks here, and why."""
    try:
        from pyqvm.host.accel import choose_accelerator, kvm_status

        status = kvm_status()
        picked = choose_accelerator("auto", status)
    except Exception as e:  # a broken host check must not cost the table
        return f"unknown ({type(e).__name__}: {e})"
    return f"{picked} (pyqvm's auto choice; KVM: {status.reason})"


def pyqvm_commit() -> str:
    out = command_output(["git", "rev-parse", "--short", "HEAD"])
    return f"commit {out.strip()}" if out else "unknown commit"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min), {five:.2f} (5 min)"


def describe_machine() -> dict[str, str]:
    return {
        "CPU": f"{cpu_model()}, {os.cpu_count()} cores (os.cpu_count)",
        "Memory": memory_gib(),
        "QEMU": qemu_version(),
        "Accelerator": accelerator(),
        "Kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_version()} ({sys.executable})",
        "pyqvm": pyqvm_commit(),
        "Date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "Load average at start": load(),
    }


# --- the table -----------------------------------------------------------------------------


def row(o: Outcome) -> list[str]:
    targets = TARGETS.get(o.bench.name, ())
    target = " / ".join(f"{t.text} (#{t.issue})" for t in targets) or "none stated"
    if o.error is not None:
        return [
            o.bench.name,
            "—",
            "—",
            "—",
            "—",
            target,
            f"failed: {o.error}",
            f"{o.seconds:.0f} s",
        ]
    values = o.values()
    met = " / ".join("yes" if t.met(values) else "no" for t in targets) or "—"
    other = " ".join(
        f"{k}={v}" for k, v in o.fields.items() if k not in ("pyqvm", "baseline", "ratio")
    )
    return [
        o.bench.name,
        f"{o.fields['pyqvm']} s",
        f"{o.fields['baseline']} s",
        o.fields["ratio"],
        other or "—",
        target,
        met,
        f"{o.seconds:.0f} s",
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    )


def render(machine: Mapping[str, str], outcomes: Sequence[Outcome], quick: bool) -> str:
    header = ["bench", "pyqvm", "baseline", "ratio", "other", "target (issue)", "met", "took"]
    mode = "`--quick` (fewer rounds)" if quick else "full"
    lines = ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [f"- Mode: {mode}", "", "## Results", ""]
    lines += [markdown_table(header, [row(o) for o in outcomes]), "", "## Commands", ""]
    lines += [
        f"- {o.bench.name} ({o.bench.summary}): `python bench/{o.bench.script}"
        + "".join(f" {a}" for a in o.argv[2:])
        + "`"
        for o in outcomes
    ]
    lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = [b.name for b in BENCHES]
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--only",
        nargs="+",
        choices=names,
        metavar="NAME",
        help=f"run only these benches (of: {', '.join(names)})",
    )
    ap.add_argument("--quick", action="store_true", help="fewer rounds: a look, not a figure")
    ap.add_argument(
        "--markdown-out",
        type=Path,
        metavar="PATH",
        help="also write the table (with the machine) to PATH",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds one bench may take before it is interrupted (default 1800)",
    )
    args = ap.parse_args(argv)
    chosen = [b for b in BENCHES if args.only is None or b.name in args.only]
    tty = sys.stderr.isatty()

    machine = describe_machine()
    outcomes: list[Outcome] = []
    try:
        for i, bench in enumerate(chosen, 1):
            if tty:
                print(f"[{i}/{len(chosen)}] {bench.name}: bench/{bench.script}", file=sys.stderr)
            outcome = run_bench(bench, args.quick, args.timeout, stream=tty)
            outcomes.append(outcome)
            if tty:
                verdict = outcome.error or "done"
                print(
                    f"[{i}/{len(chosen)}] {bench.name}: {verdict} in {outcome.seconds:.0f} s",
                    file=sys.stderr,
                )
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    machine["Load average at end"] = load()

    text = render(machine, outcomes, args.quick)
    sys.stdout.write(text)
    if args.markdown_out is not None:
        args.markdown_out.write_text(text)
    return 1 if any(o.error is not None for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
