"""SGLang's ``(extra_key, cache_salt)`` namespace tags as radixseg's u64 namespaces.

A stable 64-bit BLAKE2b hash, the same in every process; the radix cache
remembers the pairs it has seen so that a collision is refused rather than
shared (see the package docstring).
"""

from __future__ import annotations

import hashlib


def _tag(part: str | None, what: str) -> bytes:
    if part is None:
        return b"\x00"
    if not isinstance(part, str):
        raise TypeError(f"{what} must be a str or None, got {type(part).__name__}: {part!r}")
    raw = part.encode("utf-8", "surrogatepass")
    return b"\x01" + len(raw).to_bytes(8, "little") + raw


def _hash64(data: bytes) -> int:
    return int.from_bytes(
        hashlib.blake2b(data, digest_size=8, person=b"radixseg.sglang").digest(), "little"
    )


def namespace_of(extra_key: str | None = None, cache_salt: str | None = None) -> int:
    """The radixseg namespace (a u64) of SGLang's ``(extra_key, cache_salt)``.

    ``(None, None)`` (and an empty salt) is namespace 0, the default; any other
    pair is a stable 64-bit BLAKE2b hash of both, the same in every process.

    >>> namespace_of(), namespace_of("lora-7") == namespace_of("lora-7")
    (0, True)
    >>> namespace_of("a", None) != namespace_of(None, "a")
    True
    """
    cache_salt = cache_salt or None
    if extra_key is None and cache_salt is None:
        return 0
    return _hash64(_tag(extra_key, "extra_key") + _tag(cache_salt, "cache_salt"))
