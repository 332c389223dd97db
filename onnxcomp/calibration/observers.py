"""Activation observers (streaming statistics) and range policies (statistics -> clipping range).

Statistics are kept apart from range choice, unlike ``torch.ao.quantization`` observers whose
``dtype``/``qscheme`` tie the statistics to an integer grid. An observer only accumulates what it
is fed, in memory independent of the number of batches, and two observers merge exactly. A *range
policy* turns the statistics into a :class:`Range`; error-driven policies see the target format
only through a ``qdq(values, lo, hi)`` callable, so the same search serves int8, int4 and FP8.

Policies: ``minmax`` (exact), ``percentile``, ``entropy`` (TensorRT's KL-divergence threshold
search, as in MXNet / onnxruntime), ``mse`` (clipping-factor search, cf. AMCT IFMR) and
``histogram`` (tail trimming, cf. AMCT HFMG / torch ``HistogramObserver``). Ranges are not forced
to contain zero; the quantizer does that when it derives scale and zero point.

This module is the policies' front: :func:`make_observer` and :func:`compute_range`, and the
exact ``minmax`` and ``percentile``. The observers live in :mod:`onnxcomp.calibration.histogram`,
the KL search in :mod:`onnxcomp.calibration.kl_search` and the two error searches in
:mod:`onnxcomp.calibration.error_search`; each search is vectorized yet picks the same range,
bit for bit, as one call per candidate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from onnxcomp.calibration.error_search import QDQ, expected_error, hist_error_range, mse_range
from onnxcomp.calibration.histogram import (
    HistogramObserver,
    MinMaxObserver,
    Observer,
    Range,
    abs_histogram,
    amax_of,
    as_histogram,
    check_option,
    require_data,
    threshold_range,
)
from onnxcomp.calibration.kl_search import entropy_range
from onnxcomp.errors import ConfigError

__all__ = [
    "OBSERVER_POLICIES",
    "QDQ",
    "HistogramObserver",
    "MinMaxObserver",
    "Observer",
    "Range",
    "compute_range",
    "entropy_range",
    "hist_error_range",
    "make_observer",
    "minmax_range",
    "mse_range",
    "percentile_range",
]

OBSERVER_POLICIES = ("minmax", "percentile", "entropy", "mse", "histogram")


def minmax_range(obs: Observer, symmetric: bool = False) -> Range:
    """[min, max] of everything observed; symmetric: [-amax, amax]."""
    require_data(obs)
    return Range(-amax_of(obs), amax_of(obs)) if symmetric else Range(obs.min_val, obs.max_val)


def _quantile(counts: np.ndarray, start: float, w: float, q: float, vmin: float, vmax: float) -> float:
    """The q-quantile (numpy's 'linear' rank q*(n-1)), elements spread evenly inside their bin."""
    if q <= 0:
        return vmin
    if q >= 1:
        return vmax
    cum = np.cumsum(counts)
    pos = q * (float(cum[-1]) - 1.0)
    b = int(np.searchsorted(cum, pos, side="right"))
    before = float(cum[b - 1]) if b else 0.0
    value = start + (b + (pos - before + 0.5) / float(counts[b])) * w
    return min(max(value, vmin), vmax)


def percentile_range(obs: HistogramObserver, percentile: float = 99.99, symmetric: bool = False) -> Range:
    """t = P(p) of |x| (100 - p percent of all values lie beyond it, both tails together);
    the range is [-t, t], or clipped to the data when asymmetric (ORT's semantics). Within a bin."""
    check_option("percentile", percentile, 50, 100, integer=False)
    obs = as_histogram(obs, "percentile", need_data=True)
    t = _quantile(abs_histogram(obs), 0.0, obs.bin_width, percentile / 100.0, 0.0, amax_of(obs))
    return threshold_range(obs, t, symmetric)


#: policy -> (observer options, range options)
_OPTIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "minmax": ((), ()),
    "percentile": (("num_bins",), ("percentile",)),
    "entropy": (("num_bins",), ("num_quant_bins",)),
    "mse": (("num_bins",), ("steps",)),
    "histogram": (("num_bins",), ()),
}


def _check_options(policy: str, options: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if policy not in _OPTIONS:
        raise ConfigError(f"unknown calibration policy {policy!r}; use one of {', '.join(OBSERVER_POLICIES)}")
    stat, rng = _OPTIONS[policy]
    unknown = sorted(set(options) - set(stat) - set(rng))
    if unknown:
        valid = ", ".join(stat + rng) or "none"
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for calibration policy {policy!r}; valid: {valid}")
    return stat, rng


def make_observer(policy: str, **options: Any) -> Observer:
    """A fresh observer for ``policy``: MinMaxObserver for minmax, else HistogramObserver(num_bins).

    Accepts the policy's range options too (ignored here), so one option dict serves both calls.
    """
    _check_options(policy, options)
    if policy == "minmax":
        return MinMaxObserver()
    return HistogramObserver(options.get("num_bins", 2048))


def compute_range(policy: str, obs: Observer, qdq: QDQ | None, symmetric: bool, **options: Any) -> Range:
    """The range ``policy`` picks from ``obs``; ``qdq`` is needed by mse and histogram.

    Accepts the policy's observer options too (ignored here). Unknown policy/option: ConfigError.
    """
    _, rng_keys = _check_options(policy, options)
    kwargs = {k: v for k, v in options.items() if k in rng_keys}
    if policy == "minmax":
        return minmax_range(obs, symmetric)
    if policy == "percentile":
        return percentile_range(as_histogram(obs, policy), symmetric=symmetric, **kwargs)
    if policy == "entropy":
        hist = as_histogram(obs, policy)
        proposal = entropy_range(hist, symmetric=symmetric, **kwargs)
        if qdq is None:
            return proposal
        # The KL threshold can over-clip sparse CNN activations; keep it only where it lowers
        # the expected quantization error of the real grid (else the full range).
        full = minmax_range(hist, symmetric)
        return proposal if expected_error(hist, qdq, proposal) < expected_error(hist, qdq, full) else full
    if qdq is None:
        raise ConfigError(f"range policy {policy!r} needs a qdq function to measure quantization error")
    if policy == "mse":
        return mse_range(as_histogram(obs, policy), qdq, symmetric=symmetric, **kwargs)
    return hist_error_range(as_histogram(obs, policy), qdq, symmetric=symmetric)
