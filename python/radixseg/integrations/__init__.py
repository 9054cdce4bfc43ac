"""Engine hooks: radixseg behind the interfaces serving engines already call.

Each integration lives in its own module and is imported explicitly, so that
importing :mod:`radixseg` never pulls in an engine or its dependencies:

* :mod:`radixseg.integrations.sglang`: an allocator and a radix prefix cache
  with the method names and semantics of SGLang's
  ``TokenToKVPoolAllocator``/``PagedTokenToKVPoolAllocator`` and
  ``RadixCache``, over a :class:`radixseg.KVPool`. Needs no SGLang install.
* :mod:`radixseg.integrations.transformers`: a Hugging Face ``transformers``
  ``Cache`` (``RadixsegCache``) with prefix reuse across ``generate`` calls, and
  ``attn_implementation="radixseg"``, which reads K/V from the segments in
  place. Needs ``transformers`` (``pip install 'radixseg[transformers]'``).
"""

__all__: list[str] = []
