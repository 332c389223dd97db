"""Shared machinery of the numeric-format codecs.

The binding rules live in ``docs/formats.md`` ("the spec"). This module holds what
every element float format shares:

* :class:`ElementFormat`, the table-driven codec base class (one code per element, <= 8 bits);
* the chunked lookup drivers that make encode/decode fast and keep memory bounded;
* the error helpers that name the tensor and the first offending index.

Fast encode (the spec's HiF8 hint, generalised): every rounding boundary of a format with at most
4 significant bits lies on a bfloat16 value (at most 8 significant bits), so the code of a float32
``x`` depends only on the top 16 bits of its pattern (sign, exponent, 7 mantissa bits) plus, for
ties-to-even, one "sticky" flag telling whether the 16 dropped bits are non-zero. Folding that flag
into the lowest kept bit (round-to-odd at 8 bits, then round at <= 5 bits) is exact, so one
65536-entry ``uint8`` table per (format, rounding mode) encodes any float32 exactly.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from onnxcomp.errors import FormatError

__all__ = [
    "CHUNK",
    "ElementFormat",
    "Kind",
    "NonFinite",
    "Rounding",
    "REJECT_CODE",
    "as_float32",
    "chunked_take",
    "nonfinite_error",
    "round_magnitude",
]

Kind = Literal["int", "float", "mx"]
Rounding = Literal["rne", "rna"]
NonFinite = Literal["keep", "saturate", "error"]

#: Elements per step of the chunked drivers: big enough to amortise the Python loop, small
#: enough that the per-chunk temporaries (index buffers) stay in L2 cache.
CHUNK = 1 << 16

# Index of the high 16-bit half of a float32 when viewed as two uint16 (endianness).
_HI = 1 if sys.byteorder == "little" else 0
# Code written by the encode tables for inputs a format cannot represent (NaN/Inf into FP4).
REJECT_CODE = 0xFF


def as_float32(x: npt.ArrayLike) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array (no copy when it already is one).

    The codecs work on float32, the element type of the ONNX tensors they quantize; float64
    input is rounded to float32 first (RNE), exactly as an ONNX Cast would do.
    """
    return np.asarray(x, dtype=np.float32, order="C")


def first_index(mask: np.ndarray) -> tuple[int, ...]:
    """Index tuple of the first True element of ``mask`` in C order."""
    flat = int(np.argmax(mask.reshape(-1)))
    return tuple(int(i) for i in np.unravel_index(flat, mask.shape))


def nonfinite_error(fmt: str, x: np.ndarray, name: str | None, why: str) -> FormatError:
    """One-line FormatError counting the NaN/Inf values of ``x`` and locating the first one.

    Example: ``fp4_e2m1: 3 non-finite values (first at index (0, 17)); FP4 cannot encode NaN/Inf``.
    """
    bad = ~np.isfinite(x)
    where = f" in tensor {name!r}" if name else ""
    return FormatError(
        f"{fmt}: {int(np.count_nonzero(bad))} non-finite values{where} (first at index {first_index(bad)}); {why}"
    )


class _NonFiniteInput(Exception):
    """Internal signal: an encode table returned the reject code (caller builds the message)."""


def chunked_take(table: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """``out.flat[i] = table[index.flat[i]]`` in cache-sized chunks (no full-size intp temporary).

    ``index`` must only hold valid positions of ``table`` (callers validate; mode="wrap" is used
    because it is the fastest take mode).
    """
    src = index.reshape(-1)
    dst = out.reshape(-1)
    for start in range(0, src.size, CHUNK):
        stop = start + CHUNK
        np.take(table, src[start:stop], out=dst[start:stop], mode="wrap")


def lut_map(
    x32: np.ndarray,
    table: np.ndarray,
    sticky: bool,
    out: np.ndarray,
    check: Callable[[np.ndarray], bool] | None = None,
    inf_guard: bool = False,
) -> None:
    """``out = table[key(x32)]`` with key = top 16 bits of each float32 (module docstring).

    ``sticky`` ORs "any of the low 16 bits set" into the key (needed by ties-to-even only).
    ``inf_guard`` (plain keys only): a NaN whose payload sits in the low 16 bits has the key of
    an Inf, so a chunk whose output contains the Inf entries is redone with sticky keys.
    ``check(chunk)`` returning True on an output chunk raises :class:`_NonFiniteInput`.
    """
    halves = x32.reshape(-1).view(np.uint16)
    hi, lo = halves[_HI::2], halves[1 - _HI :: 2]
    dst = out.reshape(-1)
    n = hi.size
    in_place = np.may_share_memory(x32, out)
    sticky = sticky or (inf_guard and in_place)  # a redo would read overwritten input
    key = np.empty(min(n, CHUNK), np.uint16) if (sticky or in_place) else None
    nz = np.empty(min(n, CHUNK), np.bool_) if sticky else None
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        if key is None:
            k = hi[start:stop]
        elif nz is None:  # in place, no sticky bit: copy the keys before out overwrites them
            k = key[: stop - start]
            k[...] = hi[start:stop]
        else:
            k = key[: stop - start]
            np.not_equal(lo[start:stop], 0, out=nz[: stop - start])
            np.bitwise_or(hi[start:stop], nz[: stop - start], out=k)
        chunk = dst[start:stop]
        np.take(table, k, out=chunk, mode="wrap")
        if inf_guard and _contains_inf_entry(chunk, table):
            lut_map(x32.reshape(-1)[start:stop], table, True, chunk)
        if check is not None and check(chunk):
            raise _NonFiniteInput


_POS_INF_KEY, _NEG_INF_KEY = 0x7F80, 0xFF80


def _contains_inf_entry(chunk: np.ndarray, table: np.ndarray) -> bool:
    return bool(np.equal(chunk, table[_POS_INF_KEY]).any() or np.equal(chunk, table[_NEG_INF_KEY]).any())


def round_magnitude(q: np.ndarray, rounding: Rounding) -> np.ndarray:
    """Round non-negative float64 ``q`` to an integer: "rne" ties to even, "rna" ties away."""
    return np.rint(q) if rounding == "rne" else np.floor(q + 0.5)


def bf16_grid() -> np.ndarray:
    """All 65536 bfloat16 patterns as float32 (index = pattern): the inputs the tables are built on."""
    return (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32)


class _Lut(NamedTuple):
    codes: np.ndarray  # 65536 uint8: code of each 16-bit key
    values: np.ndarray  # 65536 float32: decoded value of each key (fused quantize-dequantize)
    sticky: bool  # keys need the sticky bit (ties-to-even)
    inf_guard: bool  # plain keys, but Inf keys must be re-checked for low-bit NaNs


@dataclass(frozen=True, eq=False, kw_only=True)
class ElementFormat:
    """An element float format: one code of ``bits`` bits per value, decoded by a table.

    Subclasses implement the two spec-derived primitives

    * :meth:`_decode_code_table` - the value of every code, straight from the bit layout;
    * :meth:`_encode_direct` - arithmetic float32 -> code conversion (rounding, saturation,
      underflow and NaN/Inf rules of the spec), slow but defined on any float32 input;

    and this class derives the fast 65536-entry encode tables from them (module docstring).
    """

    name: str
    bits: int
    onnx_dtype: int | None
    default_rounding: Rounding = "rne"
    roundings: tuple[Rounding, ...] = ("rne",)
    #: What encode does with NaN/Inf: "keep" (coded), "saturate" (Inf -> +-max, NaN coded),
    #: "error" (FormatError, spec: FP4 cannot encode NaN/Inf).
    nonfinite: NonFinite = "keep"

    kind: ClassVar[Kind] = "float"

    # ----------------------------------------------------------------- subclass primitives
    def _decode_code_table(self) -> np.ndarray:
        """Float32 value of each of the ``2**bits`` codes (NaN/Inf where the code is special)."""
        raise NotImplementedError

    def _encode_direct(self, x: np.ndarray, rounding: Rounding) -> np.ndarray:
        """Exact arithmetic encoder on float32 ``x``; uint8 codes, reject code 0xFF for NaN/Inf
        when ``nonfinite == "error"``."""
        raise NotImplementedError

    # ----------------------------------------------------------------- derived tables
    @cached_property
    def decode_table(self) -> np.ndarray:
        """Float32 value of every code (length ``2**bits``); NaN/Inf where the code is special."""
        table = np.asarray(self._decode_code_table(), dtype=np.float32)
        table.setflags(write=False)
        return table

    @cached_property
    def values(self) -> np.ndarray:
        """Sorted float32 array of all finite representable values, with a single (+0) zero."""
        table = self.decode_table
        vals = np.unique(table[np.isfinite(table)] + np.float32(0.0))  # -0 + 0 -> +0
        vals.setflags(write=False)
        return vals

    @cached_property
    def max_value(self) -> float:
        """Largest finite representable value (saturation bound)."""
        return float(self.values[-1])

    @cached_property
    def _tables(self) -> dict[str, _Lut]:
        return {}

    def _lut(self, rounding: Rounding) -> _Lut:
        """Encode tables for ``rounding``, built once from :meth:`_encode_direct` and cached."""
        cached = self._tables.get(rounding)
        if cached is None:
            with np.errstate(invalid="ignore"):  # the grid holds signalling NaN patterns
                codes = self._encode_direct(bf16_grid(), rounding).astype(np.uint8)
            # Sticky (round-to-odd) keys matter only where an odd key encodes differently from
            # its even neighbour. Ties-away differs only at Inf keys (Inf vs NaN): guard those.
            differ = codes[0::2] != codes[1::2]
            inf_pairs = [_POS_INF_KEY >> 1, _NEG_INF_KEY >> 1]
            inf_guard = bool(differ[inf_pairs].any())
            differ[inf_pairs] = False
            sticky = bool(differ.any())
            padded = np.full(256, np.nan, dtype=np.float32)
            padded[: 1 << self.bits] = self.decode_table
            vals = padded[codes]
            codes.setflags(write=False)
            vals.setflags(write=False)
            cached = _Lut(codes, vals, sticky, inf_guard and not sticky)
            self._tables[rounding] = cached
        return cached

    def _check_rounding(self, rounding: str | None) -> Rounding:
        if rounding is None:
            return self.default_rounding
        if rounding not in self.roundings:
            raise FormatError(f"{self.name}: unknown rounding {rounding!r}; supported: {', '.join(self.roundings)}")
        return rounding  # narrowed to Rounding by the `in self.roundings` check

    # ----------------------------------------------------------------- public codec
    def encode(self, x: npt.ArrayLike, rounding: str | None = None, *, name: str | None = None) -> np.ndarray:
        """Encode ``x`` (cast to float32) to one uint8 code per element, same shape.

        Rounding, saturation, underflow and NaN/Inf handling follow the spec section of this
        format; ``name`` (the tensor name) is used in error messages.
        """
        x32 = as_float32(x)
        out = np.empty(x32.shape, np.uint8)
        self._encode_into(x32, out, self._check_rounding(rounding), name)
        return out

    def _encode_into(self, x32: np.ndarray, out: np.ndarray, rounding: Rounding, name: str | None) -> None:
        lut = self._lut(rounding)
        check = _has_reject if self.nonfinite == "error" else None
        try:
            lut_map(x32, lut.codes, lut.sticky, out, check, lut.inf_guard)
        except _NonFiniteInput:
            raise self._nonfinite_error(x32, name) from None

    def _qdq_into(self, x32: np.ndarray, out: np.ndarray, rounding: Rounding, name: str | None) -> None:
        lut = self._lut(rounding)
        check = _has_nan if self.nonfinite == "error" else None
        try:
            lut_map(x32, lut.values, lut.sticky, out, check, lut.inf_guard)
        except _NonFiniteInput:
            raise self._nonfinite_error(x32, name) from None

    def _nonfinite_error(self, x32: np.ndarray, name: str | None) -> FormatError:
        return nonfinite_error(self.name, x32, name, f"{self._family} cannot encode NaN/Inf")

    @property
    def _family(self) -> str:
        return self.name.split("_")[0].upper()

    def decode(self, codes: npt.ArrayLike) -> np.ndarray:
        """Float32 value of each code (table lookup in :attr:`decode_table`)."""
        c = np.asarray(codes, order="C")
        if c.dtype != np.uint8:
            if c.dtype.kind not in "iu":
                raise FormatError(f"{self.name}: codes must be an integer array, got {c.dtype}")
            if c.size and (int(c.min()) < 0 or int(c.max()) > 255):
                raise FormatError(f"{self.name}: codes must lie in 0..{(1 << self.bits) - 1}")
            c = c.astype(np.uint8)
        if self.bits < 8 and c.size and int(c.max()) >= 1 << self.bits:
            raise FormatError(f"{self.name}: codes must lie in 0..{(1 << self.bits) - 1}")
        out = np.empty(c.shape, np.float32)
        chunked_take(self.decode_table, c, out)
        return out

    def quantize_dequantize(
        self, x: npt.ArrayLike, rounding: str | None = None, *, name: str | None = None
    ) -> np.ndarray:
        """``decode(encode(x))`` through one fused 65536-entry float32 table (bit-identical)."""
        x32 = as_float32(x)
        out = np.empty(x32.shape, np.float32)
        self._qdq_into(x32, out, self._check_rounding(rounding), name)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _has_reject(chunk: np.ndarray) -> bool:
    return bool(chunk.size) and int(chunk.max()) == REJECT_CODE


def _has_nan(chunk: np.ndarray) -> bool:
    return bool(np.isnan(chunk).any())
