"""Progress of a long command: a tqdm bar on a terminal, plain lines when the output goes to a pipe or a log.

`Progress(total, desc)` counts units done (`update`, or `set` for an absolute count); on a terminal it draws a
bar, elsewhere it writes `desc: n/total unit (postfix)` lines, at most one every `every_s` seconds and always the
last. `write` prints a result line without breaking the bar.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "step", *, stream: TextIO | None = None,
                 every_s: float = 10.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled, self.every_s = enabled, every_s
        self.postfix = ""
        self._last_line: float | None = None
        self.bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **postfix) -> None:
        self.set(self.n + n, **postfix)

    def set(self, n: int, **postfix) -> None:
        self.n = n
        if postfix:
            self.postfix = ", ".join(f"{key}={value}" for key, value in postfix.items())
        if self.bar is not None:
            self.bar.n = n
            if postfix:
                self.bar.set_postfix_str(self.postfix, refresh=False)
            self.bar.refresh()
        elif self.enabled and self._line_due():
            detail = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {n}/{self.total} {self.unit}{detail}", file=self.stream, flush=True)
            self._last_line = time.monotonic()

    def follow(self, done: int, total: int, **postfix) -> None:
        """An absolute count out of a total that the work itself decides."""
        self.total = total
        if self.bar is not None:
            self.bar.total = total
        self.set(done, **postfix)

    def trainer_callback(self, step: int, total: int, loss: float) -> None:
        """The trainer's `progress(step, total, loss)`."""
        self.follow(step, total, loss=f"{loss:.4f}")

    def write(self, line: str, file: TextIO | None = None) -> None:
        """A result line (on stdout unless `file` says otherwise), above the bar rather than through it."""
        file = file if file is not None else sys.stdout
        if self.bar is not None:
            self.bar.write(line, file=file)
        else:
            print(line, file=file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line_due(self) -> bool:
        return (self._last_line is None or self.n >= self.total
                or time.monotonic() - self._last_line >= self.every_s)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream: no bar
        return False
