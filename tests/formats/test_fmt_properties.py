"""Hypothesis properties of every codec: idempotence, monotonicity, sign symmetry,
representability and the half-spacing error bound (inside the range)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from fmt_oracle import ELEMENT_FORMATS, ROUNDINGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxcomp.formats import ElementFormat, IntegerFormat, MXFormat, get_format

CASES = [(n, r) for n in ELEMENT_FORMATS for r in ROUNDINGS.get(n, ["rne"])]
# FMT_EXAMPLES=3000 for a deeper local run (CI default keeps the folder well under 60 s)
SETTINGS = settings(
    max_examples=int(os.environ.get("FMT_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

_any_finite = st.floats(width=32, allow_nan=False, allow_infinity=False)


def _arrays(limit: float) -> st.SearchStrategy[np.ndarray]:
    """float32 arrays mixing in-range values, tiny values and anything finite (incl. subnormals)."""
    lim = float(np.float32(limit))
    elements = st.one_of(
        st.floats(-lim, lim, width=32),
        st.floats(-lim * 2.0**-20, lim * 2.0**-20, width=32),
        _any_finite,
    )
    return hnp.arrays(np.float32, st.integers(1, 48), elements=elements)


def _element(name: str) -> ElementFormat:
    fmt = get_format(name)
    assert isinstance(fmt, ElementFormat)
    return fmt


def _check_element(fmt: ElementFormat, rounding: str, x: np.ndarray) -> None:
    q = fmt.quantize_dequantize(x, rounding)
    # idempotence
    assert np.array_equal(fmt.quantize_dequantize(q, rounding), q)
    # monotonicity
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(q[order].astype(np.float64)) >= 0)
    # sign symmetry (HiF8 has a single unsigned zero)
    assert np.array_equal(fmt.quantize_dequantize(-x, rounding), -q)
    codes, neg_codes = fmt.encode(x, rounding), fmt.encode(-x, rounding)
    sign = np.uint8(1 << (fmt.bits - 1))
    flipped = codes ^ sign
    if fmt.name == "hif8":
        flipped = np.where(codes == 0, codes, flipped)
    assert np.array_equal(neg_codes, flipped)
    # always representable
    assert np.isin(q, fmt.values).all()
    # |x - q| <= half the local spacing inside the range, saturation outside
    vals = fmt.values.astype(np.float64)
    x64 = x.astype(np.float64)
    inside = np.abs(x64) <= vals[-1]
    i = np.clip(np.searchsorted(vals, x64[inside]), 1, len(vals) - 1)
    half = (vals[i] - vals[i - 1]) / 2
    assert np.all(np.abs(x64[inside] - q[inside]) <= half)
    assert np.all(np.abs(q[~inside]) == vals[-1])


@pytest.mark.parametrize(("name", "rounding"), CASES)
def test_element_properties(name: str, rounding: str) -> None:
    fmt = _element(name)

    @SETTINGS
    @given(_arrays(2 * fmt.max_value))
    def run(x: np.ndarray) -> None:
        _check_element(fmt, rounding, x)

    run()


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4"])
def test_integer_properties(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, IntegerFormat)

    @SETTINGS
    @given(
        x=_arrays(1e4),
        scale=st.floats(float(np.float32(1e-6)), 1e3, width=32),
        zp=st.integers(fmt.qmin, fmt.qmax),
    )
    def run(x: np.ndarray, scale: float, zp: int) -> None:
        s = np.float32(scale)
        z = np.array(zp, fmt.storage_dtype)
        q = fmt.quantize(x, s, z)
        assert q.dtype == fmt.storage_dtype
        assert (q >= fmt.qmin).all() and (q <= fmt.qmax).all()
        y = fmt.dequantize(q, s, z)
        assert np.array_equal(fmt.quantize_dequantize(y, s, z), y)  # idempotence
        order = np.argsort(x, kind="stable")
        assert np.all(np.diff(q[order].astype(np.int32)) >= 0)  # monotone
        lo, hi = (fmt.qmin - zp) * float(s), (fmt.qmax - zp) * float(s)
        x64 = x.astype(np.float64)
        inside = (x64 >= lo) & (x64 <= hi)
        assert np.all(np.abs(x64[inside] - y[inside]) <= float(s) * (0.5 + 1e-6))

    run()


@pytest.mark.parametrize("name", ["int8", "uint8", "int4", "uint4"])
def test_qparams_properties(name: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, IntegerFormat)

    @SETTINGS
    @given(a=_any_finite, b=_any_finite, symmetric=st.booleans())
    def run(a: float, b: float, symmetric: bool) -> None:
        lo, hi = min(a, b), max(a, b)
        scale, zp = fmt.compute_qparams(np.float32(lo), np.float32(hi), symmetric)
        assert np.isfinite(scale) and scale > 0
        assert fmt.qmin <= int(zp) <= fmt.qmax
        # zero is exact and the widened range is covered (up to one step of rounding)
        assert fmt.quantize_dequantize(np.float32(0.0), scale, zp) == 0
        for end in (min(lo, 0.0), max(hi, 0.0)):
            if abs(end) < 1e37:
                err = abs(float(fmt.quantize_dequantize(np.float32(end), scale, zp)) - end)
                assert err <= float(scale) * 1.01 + 1e-30

    run()


@pytest.mark.parametrize("rule", ["ref", "ocp"])
@pytest.mark.parametrize("name", ["mxfp8", "mxfp4"])
def test_mx_properties(name: str, rule: str) -> None:
    fmt = get_format(name)
    assert isinstance(fmt, MXFormat)

    shapes = st.tuples(st.integers(1, 3), st.integers(1, 70))

    @SETTINGS
    @given(hnp.arrays(np.float32, shapes, elements=_any_finite | st.floats(-10, 10, width=32)))
    def run(x: np.ndarray) -> None:
        q = fmt.quantize_dequantize(x, scale_rule=rule)
        assert q.shape == x.shape and np.isfinite(q).all()
        assert np.array_equal(fmt.quantize_dequantize(q, scale_rule=rule), q)  # idempotence
        assert np.array_equal(fmt.quantize_dequantize(-x, scale_rule=rule), -q)  # sign symmetry
        exps = fmt.scale_exponents(x, scale_rule=rule)
        k = x.shape[1]
        per_elem = np.repeat(exps, 32, axis=1)[:, :k]
        scaled = q.astype(np.float64) / 2.0**per_elem
        assert np.isin(scaled, fmt.element.values).all()  # representable
        # |x - q| <= half the local element spacing at the block scale; beyond: saturation
        vals = fmt.element.values.astype(np.float64)
        x64 = x.astype(np.float64)
        xs = x64 / 2.0**per_elem
        inside = np.abs(xs) <= vals[-1]
        i = np.clip(np.searchsorted(vals, xs[inside]), 1, len(vals) - 1)
        half = (vals[i] - vals[i - 1]) / 2 * 2.0 ** per_elem[inside]
        assert np.all(np.abs(x64[inside] - q[inside]) <= half)
        assert np.all(np.abs(q[~inside]) == vals[-1] * 2.0 ** per_elem[~inside])

    run()
