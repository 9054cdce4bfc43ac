"""Engine hooks: radixseg behind the interfaces serving engines already call.

Each integration lives in its own module and is imported explicitly, so that
importing :mod:`radixseg` never pulls in an engine or its dependencies:

* :mod:`radixseg.integrations.sglang`: an allocator and a radix prefix cache
  with the method names and semantics of SGLang's
  ``TokenToKVPoolAllocator``/``PagedTokenToKVPoolAllocator`` and
  ``RadixCache``, over a :class:`radixseg.KVPool`. Needs no SGLang install.
"""

__all__: list[str] = []
