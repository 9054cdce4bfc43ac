"""Hugging Face ``transformers`` generation over radixseg's segments.

Two pieces, used together:

* :class:`RadixsegCache`: a ``transformers`` :class:`~transformers.Cache`
  whose per-layer objects (:class:`RadixsegLayer`, a ``CacheLayerMixin``)
  store each forward pass's K/V in a :class:`~radixseg.KVPool` through a
  :class:`~radixseg.PrefixCache`. Prompts that share a prefix with an earlier,
  finished request reuse its cached pages: ``generate`` then prefills only
  the suffix, and :attr:`RadixsegCache.reused_tokens` says how many tokens
  were skipped.
* ``attn_implementation="radixseg"``: registered in transformers'
  ``AttentionInterface`` when this module is imported. The model's attention
  then reads K/V straight from the segments through :mod:`radixseg.attention`
  (:func:`~radixseg.attention.extend` for prefill, :func:`~radixseg.attention.decode`
  for one new token), so no contiguous copy of the context is gathered per
  token. Any other attention implementation works too, with
  ``RadixsegCache(..., attention="gather")``, which hands the layer a gathered
  ``[batch, kv_heads, seq, head_dim]`` copy the way ``DynamicCache`` does.

Example (a tiny random model; real models load the same way)::

    import torch, transformers
    from radixseg.integrations.transformers import RadixsegCache, prefix_cache_for

    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation("radixseg")
    prefix = prefix_cache_for(model.config, dtype="fp8")      # one per model, shared
    prompt = torch.randint(0, 128, (1, 300))
    cache = RadixsegCache(prefix, prompt)
    out = model.generate(prompt, cache=cache, max_new_tokens=16, do_sample=False)
    cache.finish(out)                     # prompt + answer stay cached for later prompts
    cache2 = RadixsegCache(prefix, out)   # a follow-up turn: reuses the whole first turn
    cache2.reused_tokens                  # 304: whole 16-token pages of prompt + answer

(``transformers`` releases before 5.2x name the ``cache`` argument
``past_key_values``; both work.)

What is not supported, and raises :class:`~radixseg.InvalidArgument` rather
than computing something wrong: padded batches (rows of a batch must have the
same length with no padding), sliding-window, chunked and soft-capped
attention layers, beam search and other cache reordering, cropping (assisted
decoding), and attention masks other than causal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "radixseg.integrations.transformers needs transformers>=5.5: "
        "pip install 'transformers>=5.5'"
    ) from e

from radixseg import attention as _attn
from radixseg._core import InvalidArgument
from radixseg.cache import PrefixCache, Request
from radixseg.pool import KVPool

__all__ = [
    "ATTENTION_NAME",
    "RadixsegCache",
    "RadixsegLayer",
    "model_geometry",
    "prefix_cache_for",
    "radixseg_attention",
]

ATTENTION_NAME = "radixseg"
"""The ``attn_implementation`` name this module registers."""

_HANDLE = "_radixseg_step"
AttentionMode = Literal["segments", "gather"]
Backend = Literal["auto", "triton", "torch", "cpu"]


# ----- model geometry -------------------------------------------------------------------


def model_geometry(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config.

    Reads ``num_hidden_layers``, ``num_key_value_heads`` (default
    ``num_attention_heads``) and ``head_dim`` (default ``hidden_size //
    num_attention_heads``), from the text config of multimodal models. Raises
    :class:`InvalidArgument` for layer types other than full attention.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        layers = int(text.num_hidden_layers)
        q_heads = int(text.num_attention_heads)
    except AttributeError as e:
        raise InvalidArgument(
            f"config {type(config).__name__} lacks num_hidden_layers / num_attention_heads; "
            f"radixseg supports decoder-only attention models"
        ) from e
    kv_heads = int(getattr(text, "num_key_value_heads", None) or q_heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // q_heads
    types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise InvalidArgument(
            f"config has layer types {other}; RadixsegCache supports full-attention layers only "
            f"(sliding, chunked and linear-attention layers are not implemented)"
        )
    if getattr(text, "attn_logit_softcapping", None):
        raise InvalidArgument("attention logit soft-capping is not supported by radixseg attention")
    return layers, kv_heads, int(head_dim)


def prefix_cache_for(
    config: Any,
    *,
    dtype: torch.dtype | str = torch.float8_e4m3fn,
    page_size: int = 16,
    device: str | torch.device = "cpu",
    segment_bytes: int | None = None,
    budget_bytes: int | str | None = None,
    **pool_kwargs: Any,
) -> PrefixCache:
    """A :class:`PrefixCache` over a new :class:`KVPool` shaped for ``config``.

    Make one per model and share it between :class:`RadixsegCache` objects:
    prefixes are reused across them. ``dtype`` is the KV storage type (FP8
    with per-token, per-head scales by default; ``"bf16"``, ``"fp16"`` or
    ``"fp32"`` store K/V as the model computed them). Other keyword arguments
    go to :class:`KVPool`.
    """
    layers, kv_heads, head_dim = model_geometry(config)
    pool = KVPool(
        layers,
        kv_heads,
        head_dim,
        page_size=page_size,
        dtype=dtype,
        device=device,
        segment_bytes=segment_bytes,
        budget_bytes=budget_bytes,
        **pool_kwargs,
    )
    return PrefixCache(pool)


# ----- the cache ------------------------------------------------------------------------


class _Step:
    """What one forward pass added: read by every layer and by the attention function."""

    __slots__ = ("consumed", "kv_indices", "kv_indptr", "kv_last_page_len", "qo_indptr", "slots")

    def __init__(
        self,
        slots: torch.Tensor,
        qo_indptr: torch.Tensor,
        table: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> None:
        self.slots = slots
        self.qo_indptr = qo_indptr
        self.kv_indptr, self.kv_indices, self.kv_last_page_len = table
        self.consumed = True


class _Handle:
    """Attached to the key tensor a layer returns: where the attention reads from."""

    __slots__ = ("cache", "layer", "step")

    def __init__(self, cache: RadixsegCache, layer: int, step: _Step) -> None:
        self.cache = cache
        self.layer = layer
        self.step = step


class RadixsegLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One model layer's view of a :class:`RadixsegCache` (``transformers`` layer API).

    ``update(key_states, value_states)`` takes ``[batch, kv_heads, new, head_dim]``
    tensors, writes them at the slots the cache allocated for this step, and
    returns either the new states tagged for ``attn_implementation="radixseg"``
    (``attention="segments"``) or the gathered ``[batch, kv_heads, seq,
    head_dim]`` context (``attention="gather"``).
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: RadixsegCache, layer_idx: int, length: int) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._cache = cache
        self.layer_idx = layer_idx
        self.length = length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cache._update_layer(self, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise InvalidArgument(
            "a RadixsegCache cannot be reset in place; finish() or abort() it and make a new one"
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise InvalidArgument("RadixsegCache does not support beam search (cache reordering)")

    def crop(self, tokens_to_remove: int) -> None:
        raise InvalidArgument("RadixsegCache does not support cropping (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise InvalidArgument(
            f"RadixsegCache cannot repeat its batch ({repeats}x): make one cache per returned "
            f"sequence, or pass the prompt repeated"
        )

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise InvalidArgument("RadixsegCache does not support selecting batch rows")

    def offload(self) -> None:
        raise InvalidArgument("RadixsegCache does not support offloading; the pool owns the KV")

    def prefetch(self) -> None:
        raise InvalidArgument("RadixsegCache does not support offloading; the pool owns the KV")


def _as_rows(input_ids: Any) -> list[torch.Tensor]:
    if isinstance(input_ids, torch.Tensor):
        t = input_ids
    elif isinstance(input_ids, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(input_ids))
    elif isinstance(input_ids, Sequence) and input_ids and isinstance(input_ids[0], Sequence):
        rows = [torch.as_tensor(list(r), dtype=torch.int64) for r in input_ids]
        lens = {r.numel() for r in rows}
        if len(lens) != 1:
            raise InvalidArgument(
                f"rows of input_ids have different lengths {sorted(lens)}; RadixsegCache needs "
                f"unpadded rows of one length (make one cache per length)"
            )
        t = torch.stack(rows)
    else:
        t = torch.as_tensor(input_ids)
    if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise InvalidArgument(f"input_ids must hold integers, got {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InvalidArgument(f"input_ids must be [batch, seq], got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidArgument(f"input_ids must be non-empty, got shape {tuple(t.shape)}")
    return [t[i].detach().to("cpu", torch.int64) for i in range(t.shape[0])]


class RadixsegCache(Cache):
    """A ``transformers`` cache over a shared :class:`PrefixCache`: one per ``generate`` call.

    Parameters
    ----------
    prefix_cache : PrefixCache
        Shared by all caches of one model (see :func:`prefix_cache_for`); its
        pool's geometry must match the model's.
    input_ids : int ``[batch, seq]`` (tensor, array or nested lists; ``[seq]`` for one row)
        The prompts ``generate`` will see. Each row begins a request whose
        longest cached prefix (whole pages, never the last token) is reused;
        for a batch the common reused length is the smallest over the rows.
        Rows must not be padded.
    namespace : int
        Prefixes are shared only within a namespace (a tenant).
    attention : "segments" or "gather"
        ``"segments"`` (default): the model must use
        ``attn_implementation="radixseg"``, which reads the pool in place;
        the cache raises if another attention implementation received its
        states. ``"gather"``: any attention implementation; each layer gets a
        gathered copy of its whole context every step (dequantized).
    backend : "auto", "triton", "torch" or "cpu"
        :mod:`radixseg.attention` backend (``"auto"``: Triton on CUDA, the
        native kernel for decode steps and torch for prefill on CPU).

    Call :meth:`finish` with ``generate``'s output to keep the prompt and the
    generated tokens cached for later prompts, or :meth:`abort` to drop them;
    the cache is a context manager that aborts on exit if neither was called.
    """

    def __init__(
        self,
        prefix_cache: PrefixCache,
        input_ids: Any,
        *,
        namespace: int = 0,
        attention: AttentionMode = "segments",
        backend: Backend = "auto",
    ) -> None:
        if not isinstance(prefix_cache, PrefixCache):
            raise TypeError(
                f"prefix_cache must be a PrefixCache, got {type(prefix_cache).__name__}"
            )
        if attention not in ("segments", "gather"):
            raise InvalidArgument(f"attention must be 'segments' or 'gather', got {attention!r}")
        if backend not in ("auto", "triton", "torch", "cpu"):
            raise InvalidArgument(
                f"backend must be 'auto', 'triton', 'torch' or 'cpu', got {backend!r}"
            )
        rows = _as_rows(input_ids)
        self.prefix_cache = prefix_cache
        self.pool = prefix_cache.pool
        self.attention = attention
        self.backend = backend
        self.namespace = namespace
        self._prompts = rows
        self.requests: list[Request] = self._begin(rows, namespace)
        reused = self.requests[0].cached_len
        self.reused_tokens = reused
        """Prompt tokens per row whose KV came from the cache (not prefilled)."""
        self.computed_tokens = 0
        """Tokens per row whose K/V this cache stored (prefill of the suffix + decode)."""
        self._length = reused
        self._step: _Step | None = None
        self._state = "running"
        self._layers = [RadixsegLayer(self, i, reused) for i in range(self.pool.num_layers)]
        super().__init__(layers=list(self._layers))

    def _begin(self, rows: list[torch.Tensor], namespace: int) -> list[Request]:
        pc = self.prefix_cache
        reqs: list[Request] = []
        try:
            for r in rows:
                reqs.append(pc.begin(r, namespace))
            common = min(q.cached_len for q in reqs)
            for i, q in enumerate(reqs):
                if q.cached_len > common:
                    # Cap the row at the batch's common prefix: match only its
                    # first `common` tokens (whole pages, so the match is exact).
                    pc.abort(q)
                    reqs[i] = pc.begin(rows[i][: common + 1], namespace)
        except BaseException:
            for q in reqs:
                if q.state == "running":
                    pc.abort(q)
            raise
        return reqs

    # ----- transformers' Cache API ----------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached per row (reused prefix + everything stored since)."""
        if layer_idx >= len(self._layers):
            return self._length
        return self._layers[layer_idx].length

    @property
    def batch_size(self) -> int:
        return len(self.requests)

    def _update_layer(
        self, layer: RadixsegLayer, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._state != "running":
            raise InvalidArgument(f"this RadixsegCache is {self._state}; make a new one")
        b, h, t, d = k.shape
        pool = self.pool
        if b != len(self.requests) or h != pool.num_kv_heads or d != pool.head_dim:
            raise InvalidArgument(
                f"layer {layer.layer_idx} got K of shape {tuple(k.shape)}; this cache holds "
                f"[{len(self.requests)}, {pool.num_kv_heads}, seq, {pool.head_dim}] "
                f"(batch, kv_heads, seq, head_dim)"
            )
        if v.shape != k.shape:
            raise InvalidArgument(f"V shape {tuple(v.shape)} differs from K {tuple(k.shape)}")
        if layer.length == self._length:
            self._new_step(t)
        elif layer.length + t != self._length:
            raise InvalidArgument(
                f"layer {layer.layer_idx} holds {layer.length} tokens and got {t} more, but this "
                f"step extends the cache to {self._length}: layers must be updated in step"
            )
        step = self._step
        assert step is not None
        if not step.consumed:
            raise InvalidArgument(
                "RadixsegCache(attention='segments') needs the model to use "
                "attn_implementation='radixseg' (model.set_attn_implementation('radixseg')); "
                "another attention implementation received only the new K/V. Use "
                "attention='gather' for other implementations."
            )
        # [B, H, T, D] -> [B * T, H, D], rows in the slot order of the step.
        kk = k.transpose(1, 2).reshape(b * t, h, d)
        vv = v.transpose(1, 2).reshape(b * t, h, d)
        pool.write(layer.layer_idx, step.slots, kk, vv, check=False)
        layer.length += t
        if self.attention == "gather":
            return self._gather(layer.layer_idx, k.dtype)
        step.consumed = False
        setattr(k, _HANDLE, _Handle(self, layer.layer_idx, step))
        return k, v

    def _new_step(self, t: int) -> None:
        """Allocate slots for ``t`` new tokens per row (before the first layer writes)."""
        pc = self.prefix_cache
        start = self._length
        grown: list[tuple[Request, int]] = []
        slots = []
        try:
            for req, prompt in zip(self.requests, self._prompts, strict=True):
                toks = prompt[start : start + t]
                if toks.numel() < t:
                    # Generated tokens are not known to the cache yet: placeholders,
                    # replaced by finish() with the real ones.
                    toks = torch.cat([toks, torch.zeros(t - toks.numel(), dtype=torch.int64)])
                before = (req.seq_len, req.num_pages)
                slots.append(pc.extend(req, toks))
                grown.append((req, before[1]))
        except BaseException:
            for req, pages in grown:
                _truncate(pc, req, start, pages)
            raise
        b = len(self.requests)
        dev = self.pool.device
        self._length = start + t
        self.computed_tokens += t
        self._step = _Step(
            torch.cat(slots).to(dev),
            torch.arange(0, (b + 1) * t, t, dtype=torch.int32),
            pc.page_table(self.requests),
        )

    def _gather(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pc = self.prefix_cache
        ks, vs = [], []
        for req in self.requests:
            k, v = self.pool.read(layer, pc.slots(req), check=False)
            ks.append(k)
            vs.append(v)
        # [B, S, H, D] -> [B, H, S, D]
        k = torch.stack(ks).transpose(1, 2).to(dtype)
        v = torch.stack(vs).transpose(1, 2).to(dtype)
        return k, v

    # ----- lifecycle --------------------------------------------------------------------

    def finish(self, sequences: Any) -> None:
        """Cache every row's tokens for later prompts, and release the requests.

        ``sequences``: ``generate``'s output ``[batch, prompt + new]`` (or the
        ``.sequences`` of its dict output). The cache holds KV for all but the
        last generated token; those tokens (whole pages) enter the prefix
        cache. Raises :class:`InvalidArgument`, changing nothing, when a row
        does not continue its prompt.
        """
        self._check_running()
        if hasattr(sequences, "sequences"):
            sequences = sequences.sequences
        rows = _as_rows(sequences)
        if len(rows) != len(self.requests):
            raise InvalidArgument(
                f"sequences has {len(rows)} rows; this cache holds {len(self.requests)} requests"
            )
        if self._step is not None and not self._step.consumed:
            self.abort()
            raise InvalidArgument(
                "the model's attention never read this cache (use "
                "attn_implementation='radixseg' or attention='gather'); its output is not "
                "attention over the cached context, so nothing was cached"
            )
        n = self._length
        prompt_len = self._prompts[0].numel()
        for i, (row, prompt) in enumerate(zip(rows, self._prompts, strict=True)):
            if row.numel() < n:
                raise InvalidArgument(
                    f"sequences row {i} has {row.numel()} tokens; the cache holds KV for {n}"
                )
            if not torch.equal(row[:prompt_len], prompt):
                raise InvalidArgument(f"sequences row {i} does not start with its prompt")
            lo, hi = int(row[:n].min()), int(row[:n].max())
            if lo < 0 or hi >= 2**31:
                raise InvalidArgument(f"sequences row {i} holds token {lo if lo < 0 else hi}")
        for row, req in zip(rows, self.requests, strict=True):
            req.tokens.copy_(row[:n].to(torch.int32))
            self.prefix_cache.finish(req)
        self._state = "finished"

    def abort(self) -> None:
        """Release the requests without caching anything they added."""
        if self._state != "running":
            return
        for req in self.requests:
            if req.state == "running":
                self.prefix_cache.abort(req)
        self._state = "aborted"

    def _check_running(self) -> None:
        if self._state != "running":
            raise InvalidArgument(f"this RadixsegCache is already {self._state}")

    def __enter__(self) -> RadixsegCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    def stats(self) -> dict[str, Any]:
        """The pool's stats (JSON-exportable) plus this cache's length and reuse."""
        out = dict(self.pool.stats())
        out.update(
            batch=len(self.requests),
            seq_len=self._length,
            reused_tokens_per_row=self.reused_tokens,
            computed_tokens_per_row=self.computed_tokens,
            state=self._state,
        )
        return out

    def __repr__(self) -> str:
        return (
            f"RadixsegCache(batch={len(self.requests)}, seq_len={self._length}, "
            f"reused={self.reused_tokens}, attention={self.attention!r}, state={self._state})"
        )


def _truncate(pc: PrefixCache, req: Request, seq_len: int, pages: int) -> None:
    """Undo one ``extend`` of ``req``: back to ``seq_len`` tokens and ``pages`` pages."""
    extra = req.page_ids[pages:].clone()
    req._tokens.n = seq_len
    req._pages.n = pages
    if extra.numel():
        pc.pool.release(extra)


# ----- the attention function -----------------------------------------------------------


def radixseg_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers`` attention function reading K/V from a :class:`RadixsegCache`.

    ``query``: ``[batch, q_heads, new, head_dim]``; ``key``/``value`` are what
    :class:`RadixsegLayer` returned (the new states, tagged with where the
    step's KV lives). Returns ``([batch, new, q_heads, head_dim], None)``.
    Without a ``RadixsegCache`` (``use_cache=False``) it falls back to SDPA
    with a causal mask.
    """
    handle: _Handle | None = getattr(key, _HANDLE, None)
    if handle is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None:
        raise InvalidArgument(
            "radixseg attention supports full causal attention only (this layer asks for a "
            "sliding window or soft-capping)"
        )
    if dropout:
        raise InvalidArgument(f"radixseg attention is for inference; dropout={dropout} given")
    step = handle.step
    step.consumed = True
    cache = handle.cache
    b, hq, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    common: dict[str, Any] = {"sm_scale": scale, "backend": cache.backend, "check": False}
    if t == 1:
        out = _attn.decode(
            q,
            cache.pool,
            handle.layer,
            step.kv_indptr,
            step.kv_indices,
            step.kv_last_page_len,
            **common,
        )
    else:
        out = _attn.extend(
            q,
            cache.pool,
            handle.layer,
            step.qo_indptr,
            step.kv_indptr,
            step.kv_indices,
            step.kv_last_page_len,
            causal=True,
            **common,
        )
    return out.view(b, t, hq, d), None


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, radixseg_attention)


_register()
