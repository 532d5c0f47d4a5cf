"""What a first use shows while it builds the image it needs: one rewritten line on a
terminal, nothing extra in a pipe."""

from __future__ import annotations

import io

from pyqvm.cli.firstuse import terminal_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_no_progress_line() -> None:
    assert terminal_progress(io.StringIO()) is None


def test_a_terminal_gets_one_line_rewritten_and_ended() -> None:
    term = Terminal()
    show = terminal_progress(term)
    assert show is not None
    total = 10 << 20
    for done in range(0, total + 1, 1 << 12):  # 2561 reports, 4 KiB apart
        show(done, total)
    text = term.getvalue()
    assert text.count("\n") == 1 and text.endswith("downloaded 10.0 of 10.0 MiB\n")
    # redrawn at each half percent, not at every chunk
    assert 100 < text.count("\r") <= 201
    assert "\rpyqvm: downloaded 5.0 of 10.0 MiB" in text
