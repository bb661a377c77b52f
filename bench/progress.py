"""A progress bar on stderr: tqdm when it is installed, else a plain counter (no hard dependency)."""

from __future__ import annotations

import sys


class Progress:
    """``with Progress(total) as p: p.update(label)``. Logs (not a terminal) get one line per item instead."""

    def __init__(self, total: int, desc: str = "bench", stream=None):
        self.total, self.done, self.desc = total, 0, desc
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if self.tty:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, label: str = "") -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=False)
            self._bar.update(1)
        elif self.tty:
            self.stream.write(f"\r{self.desc} [{self.done}/{self.total}] {label[:60]:<60}")
            self.stream.flush()
        else:
            self.stream.write(f"{self.desc} [{self.done}/{self.total}] {label}\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.tty:
            self.stream.write("\n")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
