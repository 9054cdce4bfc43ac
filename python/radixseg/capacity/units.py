"""Numbers for the capacity planner: sizes and counts with units, range checks.

``parse_bytes`` and ``parse_count`` read what a person types (``80GB``,
``80GiB``, ``10M``, ``10_000_000``); ``_check_int`` refuses what does not fit
the signed 64-bit quantities torch and the Rust core use, naming the value.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation

from radixseg._core import InvalidArgument

__all__ = ["MAX_VALUE", "parse_bytes", "parse_count"]


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Every size and count is a signed 64-bit quantity somewhere (torch, the Rust
# core): larger inputs are refused by name instead of overflowing later.
MAX_VALUE = 2**63 - 1


def _shown(v: object) -> str:
    """``repr`` of a value for a message; huge ints as a power of two (repr would
    take seconds, or refuse past 4,300 digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"{'-' if v < 0 else ''}~2^{abs(v).bit_length() - 1}"
    return repr(v)


def _check_int(name: str, v: object, lo: int, hi: int = MAX_VALUE) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
        return int(v)
    raise InvalidArgument(
        f"{name}={_shown(v)} is out of range: it must be an integer in {lo:,}..={hi:,}"
    )


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_NUMBER = re.compile(r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def _parse(text: str | int, what: str, units: Mapping[str, int], example: str) -> int:
    if _is_int(text):
        return _check_int(what, text, 0)
    m = _NUMBER.fullmatch(text) if isinstance(text, str) else None
    unit = units.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        names = ", ".join(u for u in units if u)
        raise InvalidArgument(
            f"{what}={text!r} is not understood: give a whole number, optionally with "
            f"a unit ({names}; case-insensitive), e.g. {example}"
        )
    try:
        value = Decimal(m.group(1).replace("_", "").replace(",", "")) * unit
    except InvalidOperation:
        raise InvalidArgument(f"{what}={text!r} is not a number") from None
    if value > MAX_VALUE:
        raise InvalidArgument(f"{what}={text!r} is past the limit of {MAX_VALUE:,} (2^63 - 1)")
    if value != value.to_integral_value():
        raise InvalidArgument(f"{what}={text!r} is not a whole number ({value})")
    return int(value)


def parse_bytes(text: str | int, what: str = "size") -> int:
    """Bytes from ``80GB`` (10^9), ``80GiB`` (2^30), ``1.5TB``, ``85_899_345_920`` or an int.

    >>> parse_bytes("80GB"), parse_bytes("80GiB"), parse_bytes("64MiB")
    (80000000000, 85899345920, 67108864)
    """
    return _parse(text, what, _BYTE_UNITS, "80GB or 80GiB")


def parse_count(text: str | int, what: str = "count") -> int:
    """Tokens from ``10000000``, ``10_000_000``, ``10M`` (10^6), ``10Mi`` (2^20) or an int.

    >>> parse_count("10M"), parse_count("128Ki"), parse_count("1e7")
    (10000000, 131072, 10000000)
    """
    return _parse(text, what, _COUNT_UNITS, "10000000 or 10M")
