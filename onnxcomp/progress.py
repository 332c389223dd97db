"""Progress display on long steps (tqdm on stderr; silent with --quiet or when disabled)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar when ``enabled`` and stderr is a terminal, otherwise a no-op object."""
    if not enabled or not sys.stderr.isatty():  # no bar residue in logs and CI output
        yield _Silent()
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.2)
    try:
        yield bar
    finally:
        bar.close()
