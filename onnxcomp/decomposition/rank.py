"""Rank rules: how many singular values a low-rank factorisation keeps.

A rule is written as text (recipes, CLI) and parsed by :func:`parse_rank_rule`:

* ``auto`` -- EVBMF (empirical variational Bayes matrix factorisation, Nakajima et al., JMLR 14,
  2013): estimate the noise variance ``sigma2`` of the matrix by minimising the EVB free energy
  over ``[lower, upper]`` with bounded Brent search, keep the singular values above
  ``sqrt(M * sigma2 * (1 + tau) * (1 + alpha / tau))`` (``alpha = L/M``, ``tau = 2.5129 sqrt(alpha)``,
  ``L <= M`` the matrix sides), then clamp to the band ``[Lb // (d+1), Lb // d]`` with
  ``Lb = min(kernel) * min(Cin, Cout)`` and ``d`` = 6 (4 when ``min(Cin, Cout) >= 256``), as the
  reference toolkit (AMCT) does. Differences from AMCT, on purpose: the search runs on
  ``sigma2 / upper`` (AMCT's absolute tolerance 1e-5 is as wide as the whole interval for
  small weights, which made its estimate depend on the weight scale) and the lower bound uses
  ``mean(s[h+1:]**2)`` as the published algorithm does (AMCT's C++ uses ``s[h:]``);
* ``energy:E`` -- the fewest singular values holding a fraction ``E`` of ``sum(s**2)``;
* ``ratio:R`` -- ``round(R * min(Cin, Cout))`` (``min(K, N)`` for a matrix);
* ``rank:N`` -- ``N``.

Every rule's rank is then aligned like AMCT's ``MakeDivisible``: ``max(a, round(r / a) * a)``,
plus ``a`` when that is below ``0.9 * r`` (``a`` = ``align``, 16 by default; ``align = 1``
leaves the rank alone), except ``energy``, which rounds up so the kept fraction stays >= E;
the result is capped at the number of singular values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from onnxcomp.errors import ConfigError

RuleKind = Literal["auto", "energy", "ratio", "rank"]
_TAU_FACTOR = 2.5129  # Nakajima et al.: tau_bar = 2.5129 * sqrt(alpha)


@dataclass(frozen=True)
class RankRule:
    """A parsed rank rule (see the module docstring)."""

    kind: RuleKind
    value: float = 0.0

    def __str__(self) -> str:
        if self.kind == "auto":
            return "auto"
        if self.kind == "rank":
            return f"rank:{int(self.value)}"
        return f"{self.kind}:{self.value:g}"


def parse_rank_rule(text: str) -> RankRule:
    """``auto``, ``energy:E`` (0 < E <= 1), ``ratio:R`` (0 < R <= 1) or ``rank:N`` (N >= 1)."""
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    usage = "expected auto, energy:E (0 < E <= 1), ratio:R (0 < R <= 1) or rank:N (N >= 1)"
    if kind == "auto" and not arg:
        return RankRule("auto")
    if kind not in ("energy", "ratio", "rank") or not arg:
        raise ConfigError(f"rank rule {text!r}: {usage}")
    try:
        value = int(arg) if kind == "rank" else float(arg)
    except ValueError:
        raise ConfigError(f"rank rule {text!r}: {arg!r} is not a number; {usage}") from None
    if (kind == "rank" and value < 1) or (kind != "rank" and not 0.0 < value <= 1.0):
        raise ConfigError(f"rank rule {text!r}: out of range; {usage}")
    return RankRule(kind, float(value))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Band:
    """The auto rule's clamp: ``[Lb // (d+1), Lb // d]`` with ``d = divisor`` (``wide_divisor``
    when ``min(Cin, Cout) >= wide_channels``); ``divisor = 0`` disables the clamp."""

    divisor: int = 6
    wide_divisor: int = 4
    wide_channels: int = 256

    def bounds(self, kernel: int, channels: int) -> tuple[int, int] | None:
        if self.divisor <= 0:
            return None
        d = self.wide_divisor if channels >= self.wide_channels else self.divisor
        size = kernel * channels
        return size // (d + 1), size // d


@dataclass
class RankChoice:
    """The chosen rank and how it was reached (JSON-able ``detail`` for the record)."""

    rank: int
    rule: str
    detail: dict[str, Any] = field(default_factory=dict)


def align_rank(rank: int, align: int, cap: int, up: bool = False) -> int:
    """AMCT's ``MakeDivisible`` (``up``: the next multiple instead), capped at ``cap``.

    ``align <= 1`` only clamps to ``[1, cap]``.
    """
    if align <= 1:
        return max(1, min(rank, cap))
    if up:
        return min(max(align, -(-rank // align) * align), cap)
    aligned = max(align, (rank + align // 2) // align * align)
    if aligned < 0.9 * rank:
        aligned += align
    return min(aligned, cap)


def energy_rank(s: np.ndarray, fraction: float) -> int:
    """The fewest leading singular values whose squares hold ``fraction`` of the total."""
    power = np.cumsum(s.astype(np.float64) ** 2)
    if power[-1] <= 0:
        return 1
    return int(np.searchsorted(power / power[-1], fraction - 1e-12) + 1)


def choose_rank(
    s: np.ndarray, shape: tuple[int, int], rule: RankRule, kernel: int, channels: int, align: int, band: Band
) -> RankChoice:
    """The rank for singular values ``s`` (descending) of a matrix of ``shape``.

    ``kernel`` is ``min(kh, kw)`` (1 for a matrix) and ``channels`` ``min(Cin, Cout)``
    (``min(K, N)``): they define the auto rule's band and the ratio rule's base.
    """
    cap = len(s)
    detail: dict[str, Any] = {}
    if rule.kind == "rank":
        raw = int(rule.value)
    elif rule.kind == "ratio":
        raw = int(round(rule.value * channels))
    elif rule.kind == "energy":
        raw = energy_rank(s, rule.value)
    else:
        raw, sigma2, threshold = evbmf_rank(s, shape)
        detail.update(evbmf_rank=raw, sigma2=sigma2, threshold=threshold)
        bounds = band.bounds(kernel, channels)
        if bounds is not None:
            detail["band"] = list(bounds)
            raw = max(min(raw, bounds[1]), bounds[0])
    rank = align_rank(raw, align, cap, up=rule.kind == "energy")
    detail.update(raw_rank=raw, align=align, max_rank=cap)
    if rule.kind == "energy":
        power = s.astype(np.float64) ** 2
        detail["energy_kept"] = float(power[:rank].sum() / power.sum()) if power.sum() > 0 else 1.0
    return RankChoice(rank, str(rule), detail)


# --- EVBMF -----------------------------------------------------------------------------------


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    b = x - (1.0 + alpha)
    return 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))


def _free_energy(sigma2: float, s2: np.ndarray, size_l: int, size_m: int, residual: float, xubar: float) -> float:
    """The EVB objective of Nakajima et al. as a function of the noise variance (up to constants)."""
    alpha = size_l / size_m
    x = s2 / (size_m * sigma2)
    big, small = x[x > xubar], x[x <= xubar]
    tau = _tau(big, alpha)
    value = float(np.sum(small - np.log(small)))
    value += float(np.sum(big - tau) + np.sum(np.log((tau + 1.0) / big)) + alpha * np.sum(np.log(tau / alpha + 1.0)))
    return value + residual / (size_m * sigma2) + (size_l - len(s2)) * math.log(sigma2)


def evbmf_rank(s: np.ndarray, shape: tuple[int, int]) -> tuple[int, float, float]:
    """(rank, noise variance, threshold) of EVBMF for singular values ``s`` of a ``shape`` matrix."""
    size_l, size_m = min(shape), max(shape)
    s = np.asarray(s, dtype=np.float64)[:size_l]
    if s.size == 0 or s[0] <= 0:
        return 0, 0.0, 0.0
    s2 = np.maximum(s * s, s[0] ** 2 * 1e-24)  # exact zeros would make the objective infinite
    alpha = size_l / size_m
    tau_bar = _TAU_FACTOR * math.sqrt(alpha)
    xubar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)
    h_ub = min(math.ceil(size_l / (1.0 + alpha)) - 1, len(s2)) - 1
    upper = float(s2.sum()) / (size_l * size_m)
    lower = max(float(s2[h_ub + 1]) / (size_m * xubar), float(np.mean(s2[h_ub + 1 :])) / size_m)
    lower = min(lower, upper)

    def objective(t: float) -> float:
        return _free_energy(t * upper, s2, size_l, size_m, 0.0, xubar)

    sigma2 = upper * minimize_bounded(objective, lower / upper, 1.0) if lower < upper else upper
    threshold = math.sqrt(size_m * sigma2 * xubar)
    return int(np.sum(s > threshold)), sigma2, threshold


def minimize_bounded(
    f: Callable[[float], float], lo: float, hi: float, xatol: float = 1e-5, maxiter: int = 500
) -> float:
    """Brent's bounded scalar minimisation (golden section + parabolic steps) on ``[lo, hi]``."""
    sqrt_eps, golden = math.sqrt(2.2e-16), 0.5 * (3.0 - math.sqrt(5.0))
    a, b = lo, hi
    xf = v = w = a + golden * (b - a)  # xf: best so far; w: second best; v: previous w
    fx = fv = fw = f(xf)
    rat = e = 0.0
    xm = 0.5 * (a + b)
    tol1 = sqrt_eps * abs(xf) + xatol / 3.0
    for _ in range(maxiter - 1):
        tol2 = 2.0 * tol1
        if abs(xf - xm) <= tol2 - 0.5 * (b - a):
            break
        golden_step = True
        if abs(e) > tol1:  # try a parabola through (v, w, xf)
            r = (xf - w) * (fx - fv)
            q = (xf - v) * (fx - fw)
            p = (xf - v) * q - (xf - w) * r
            q = 2.0 * (q - r)
            p, q = (-p if q > 0 else p), abs(q)
            r, e = e, rat
            if abs(p) < abs(0.5 * q * r) and q * (a - xf) < p < q * (b - xf):
                rat, golden_step = p / q, False
                if (xf + rat - a) < tol2 or (b - xf - rat) < tol2:
                    rat = tol1 if xm >= xf else -tol1
        if golden_step:
            e = (a - xf) if xf >= xm else (b - xf)
            rat = golden * e
        x = xf + math.copysign(max(abs(rat), tol1), rat if rat != 0 else 1.0)
        fu = f(x)
        if fu <= fx:
            a, b = (xf, b) if x >= xf else (a, xf)
            v, fv, w, fw, xf, fx = w, fw, xf, fx, x, fu
        else:
            a, b = (x, b) if x < xf else (a, x)
            if fu <= fw or w == xf:
                v, fv, w, fw = w, fw, x, fu
            elif fu <= fv or v in (xf, w):
                v, fv = x, fu
        xm = 0.5 * (a + b)
        tol1 = sqrt_eps * abs(xf) + xatol / 3.0
    return xf
