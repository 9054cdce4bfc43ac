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
  ``AttentionInterface`` (and a matching mask function in its
  ``AttentionMaskInterface``) when this module is imported. The model's
  attention then reads K/V straight from the segments through
  :mod:`radixseg.attention` (:func:`~radixseg.attention.extend` for prefill,
  :func:`~radixseg.attention.decode` for one new token), so no contiguous
  copy of the context is gathered per token. Any other attention
  implementation works too, with ``RadixsegCache(..., attention="gather")``,
  which hands the layer a gathered ``[batch, kv_heads, seq, head_dim]`` copy
  the way ``DynamicCache`` does.

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

Left-padded batches (what a tokenizer with ``padding_side="left"`` returns)
work: give the cache the same ``attention_mask`` as ``generate``
(``RadixsegCache(prefix, batch.input_ids, attention_mask=batch.attention_mask)``).
Each row's request then holds only its real tokens: padding takes no part in
attention and is never cached. With ``attention="segments"`` the cache checks
at every step that the mask the model was given matches the padding it was
told about. Rows of a padded batch reuse no cached prefix (their real tokens
start at different positions); an unpadded batch reuses the longest prefix
all rows share.

Calling the model yourself (no ``generate``): after the cache reused a
prefix, feed only the rest of the prompt, ``input_ids[:, cache.get_seq_length():]``;
feeding the whole prompt again runs past the prompt the cache was given and
raises :class:`~radixseg.InvalidArgument`.

Sliding-window layers (Mistral's ``sliding_window``, Qwen/Gemma-style
``layer_types`` with ``"sliding_attention"``), chunked local attention
(Llama 4's ``"chunked_attention"`` layers, ``attention_chunk_size``) and
attention logit soft-capping (Gemma 2's ``attn_logit_softcapping``) are
supported: the ``"radixseg"`` attention passes the window (``window_left``),
the chunk (``chunk_size``) or the cap (``logits_soft_cap``) to the kernels,
which read only the pages the pattern reaches; ``attention="gather"`` lets
the model mask them. The cache still keeps every token of every layer (layer
groups that keep only their window are issue 20's next step).

Context parallelism (one sequence's KV sharded over ranks, issue 19): give
:func:`prefix_cache_for` a ``torch.distributed`` process group
(``group=...``), or ``context_parallel=True`` for the whole world, and it
returns a :class:`~radixseg.distributed.ShardedPrefixCache` over a
:class:`~radixseg.distributed.ShardedKVPool`; :class:`RadixsegCache` over it
is used exactly as above. Each rank loads the same model and runs the same
``generate`` on the same prompts (the cache calls are collective and
checked: different prompts raise :class:`~radixseg.distributed.RankMismatch`
on every rank), each stores ``1/R`` of the KV, and every rank returns the
same tokens as one process. ``page_size`` is then the page each rank stores;
the prefix tree counts virtual pages of ``page_size * R`` tokens, so a prefix
is reused in whole virtual pages. ``cache.stats()`` and ``pool.stats()`` are
this rank's (``pool.stats_all()`` gathers every rank's). Decode steps use
the collective :func:`radixseg.attention.decode`; prefill and extend steps
hand the step's new K/V to the collective :func:`radixseg.attention.extend`.
Sliding-window, chunked and soft-capped layers and ``attention="gather"``
are refused (:class:`~radixseg.InvalidArgument`) on a sharded cache::

    dist.init_process_group("nccl")        # one process per rank, all running this
    prefix = prefix_cache_for(model.config, dtype="bf16", device="cuda",
                              group=dist.group.WORLD)
    cache = RadixsegCache(prefix, prompt)
    out = model.generate(prompt, cache=cache, max_new_tokens=16, do_sample=False)
    cache.finish(out)                      # on every rank, like every cache call

What is not supported, and raises :class:`~radixseg.InvalidArgument` rather
than computing something wrong: right padding or holes in ``attention_mask``,
linear-attention layers, beam search,
``num_return_sequences > 1`` and other cache reordering or batch expansion,
cropping (assisted decoding), prepared 4-D attention masks and mask patterns
other than causal, sliding-window or chunked causal with left padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

try:
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "radixseg.integrations.transformers needs transformers>=5.20: "
        "pip install 'transformers>=5.20'"
    ) from e

from radixseg import attention as _attn
from radixseg._core import InvalidArgument
from radixseg.cache import PrefixCache, Request
from radixseg.capacity import kv_geometry
from radixseg.capacity.groups import layer_groups as _layer_groups
from radixseg.distributed import ShardedKVPool, ShardedPrefixCache
from radixseg.grouped import GroupedKVPool, GroupedPrefixCache
from radixseg.pool import KVPool

__all__ = [
    "ATTENTION_NAME",
    "RadixsegCache",
    "RadixsegLayer",
    "model_geometry",
    "prefix_cache_for",
    "radixseg_attention",
    "radixseg_mask",
]

ATTENTION_NAME = "radixseg"
"""The ``attn_implementation`` name this module registers."""

_HANDLE = "_radixseg_step"
AttentionMode = Literal["segments", "gather"]
Backend = Literal["auto", "triton", "torch", "cpu"]
_SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


# ----- model geometry -------------------------------------------------------------------


def model_geometry(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config.

    Read by :func:`radixseg.capacity.kv_geometry`, the reader ``radixseg plan``
    uses, from the text config of multimodal models: ``num_hidden_layers``,
    ``num_key_value_heads`` (default ``num_attention_heads``; one for
    multi-query Falcon and GPTBigCode) and ``head_dim`` (default
    ``hidden_size // num_attention_heads``). Falcon's
    ``new_decoder_architecture`` broadcasts K/V to every query head before the
    cache sees them, so the cache holds ``num_attention_heads`` there. Raises
    :class:`InvalidArgument` for layer types other than full and
    sliding-window attention, for attention logit soft-capping, and for
    multi-head latent attention whose K and V heads differ in size.
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None) or []
    other = sorted({t for t in types if t not in _SUPPORTED_LAYER_TYPES})
    if other:
        raise InvalidArgument(
            f"config has layer types {other}; RadixsegCache supports "
            f"{', '.join(_SUPPORTED_LAYER_TYPES)} layers only (linear-attention and other "
            f"linear-attention layers are not implemented)"
        )
    try:
        g = kv_geometry(text)
    except InvalidArgument as e:
        raise InvalidArgument(f"{e}; radixseg supports decoder-only attention models") from e
    if g.mla:
        # transformers' MLA attention (DeepSeek-V2/V3, Mistral-4) expands the
        # latent into per-head K and V before the cache sees them.
        k_dim = getattr(text, "qk_head_dim", None) or getattr(text, "head_dim", None)
        v_dim = getattr(text, "v_head_dim", None) or k_dim
        if not k_dim or k_dim != v_dim:
            raise InvalidArgument(
                f"config {type(config).__name__} expands multi-head latent attention into K "
                f"of {k_dim} and V of {v_dim} elements per head; RadixsegCache stores K and V "
                "of one head_dim"
            )
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        return g.num_layers, int(heads), int(k_dim)
    kv_heads = g.num_kv_heads
    if getattr(text, "model_type", None) == "falcon" and getattr(
        text, "new_decoder_architecture", False
    ):
        kv_heads = int(text.num_attention_heads)
    return g.num_layers, kv_heads, g.head_dim


def _is_windowed(config: Any) -> bool:
    """Whether ``config`` has sliding-window or chunked layers (``layer_types``
    naming them, or Mistral-style ``sliding_window`` without ``layer_types``)
    or soft-capped attention logits."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "attn_logit_softcapping", None):
        return True
    types = getattr(text, "layer_types", None)
    if types is not None:
        return "sliding_attention" in types or "chunked_attention" in types
    return (
        getattr(text, "sliding_window", None) is not None
        and getattr(text, "use_sliding_window", True) is not False
    )


_WINDOW_UNDER_CP = (
    "sliding-window, chunked and soft-capped attention are not supported under context "
    "parallelism (the kernels mask by position within one rank's share; windowed layer "
    "groups are issue 20): use a full-attention model, or one process without group="
)


def prefix_cache_for(
    config: Any,
    *,
    dtype: torch.dtype | str = torch.float8_e4m3fn,
    page_size: int = 16,
    device: str | torch.device = "cpu",
    segment_bytes: int | None = None,
    budget_bytes: int | str | None = None,
    group: Any = None,
    context_parallel: bool = False,
    layer_groups: bool | None = None,
    **pool_kwargs: Any,
) -> PrefixCache | GroupedPrefixCache:
    """A :class:`PrefixCache` over a new :class:`KVPool` shaped for ``config``.

    Make one per model and share it between :class:`RadixsegCache` objects:
    prefixes are reused across them. ``dtype`` is the KV storage type (FP8
    with per-token, per-head scales by default; ``"bf16"``, ``"fp16"`` or
    ``"fp32"`` store K/V as the model computed them). Other keyword arguments
    go to :class:`KVPool`.

    Context parallelism: with a ``torch.distributed`` process ``group``, or
    ``context_parallel=True`` (the default group, the whole world), this is
    collective and returns a :class:`~radixseg.distributed.ShardedPrefixCache`
    over a :class:`~radixseg.distributed.ShardedKVPool` (``page_size`` per
    rank; other keyword arguments, ``verify`` included, go to it): call it
    with the same arguments on every rank of the group. Sliding-window models
    are refused there (:class:`InvalidArgument`).

    Hybrid models (full-attention layers beside sliding-window or chunked
    ones: Gemma 2/3, Llama 4, Qwen2 with ``max_window_layers``): with
    ``layer_groups`` (default ``None``: whenever the model has both kinds and
    every chunk is a multiple of ``page_size``) this returns a
    :class:`~radixseg.grouped.GroupedPrefixCache` whose windowed layers keep
    only their window per request (:mod:`radixseg.grouped`); ``False`` keeps
    every layer's every token in one pool. Models whose every layer is
    windowed (Mistral) keep one pool; their kernels still skip pages outside
    the window.
    """
    layers, kv_heads, head_dim = model_geometry(config)
    sharded = context_parallel or group is not None
    storage: dict[str, Any] = dict(
        page_size=page_size,
        dtype=dtype,
        device=device,
        segment_bytes=segment_bytes,
        budget_bytes=budget_bytes,
        **pool_kwargs,
    )
    if not sharded and layer_groups is not False:
        text = (
            config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        )
        groups = _layer_groups(kv_geometry(text))
        why = None
        if len(groups) < 2 or groups[0].kind != "full":
            why = "it has no full-attention layer beside windowed ones"
        elif any(g.kind == "chunked" and (g.span or 0) % page_size for g in groups):
            why = f"a chunk is not a multiple of page_size={page_size}"
        if why is None:
            return GroupedPrefixCache(GroupedKVPool(groups, kv_heads, head_dim, **storage))
        if layer_groups:
            raise InvalidArgument(
                f"layer_groups=True for {type(config).__name__}, but {why}: "
                f"{[g.describe() for g in groups]}"
            )
    if sharded and _is_windowed(config):
        raise InvalidArgument(
            f"config {type(config).__name__} has sliding-window, chunked or soft-capped "
            f"layers; {_WINDOW_UNDER_CP}"
        )
    pool = (ShardedKVPool if sharded else KVPool)(
        layers, kv_heads, head_dim, **storage, **({"group": group} if sharded else {})
    )
    return ShardedPrefixCache(pool) if isinstance(pool, ShardedKVPool) else PrefixCache(pool)


# ----- the mask the "radixseg" attention receives ----------------------------------------


def _causal(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
    return kv_idx <= q_idx


def _mask_kind(mask_function: Callable[..., Any], size: int | None, pad: int = 0) -> str | None:
    """Which pattern ``mask_function`` (before padding) is: ``"causal"``,
    ``"sliding"`` (causal, the last ``size`` keys) or ``"chunked"`` (causal
    within chunks of ``size`` positions counted from the first real token,
    ``pad`` being row 0's left padding), else ``None``.

    Probes one query position against keys around its window's or chunk's
    edges; mask functions are index-based and accept broadcast tensors.
    """
    q = pad + 2 * (size or 0) + 8
    kv = torch.arange(q + 3)
    causal = kv <= q
    wants = {"causal": causal}
    if size is not None:
        wants = {
            "sliding": causal & (kv > q - size),
            "chunked": causal & ((kv - pad) // size == (q - pad) // size),
        }
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, torch.tensor(q), kv)
    except Exception:
        return None
    if not isinstance(got, torch.Tensor):
        return None
    for kind, want in wants.items():
        if torch.equal(got.expand_as(want), want):
            return kind
    return None


class _MaskInfo:
    """What ``create_causal_mask`` & co. give the ``"radixseg"`` attention.

    Not a 4-D tensor: the radixseg path needs only each row's padding
    (``padding``, bool ``[batch, >= q_offset + q_length]`` or ``None``), the
    window or chunk (``local_size``) and which of the patterns it computes
    the mask is (``kind``: ``"causal"``, ``"sliding"``, ``"chunked"``; ``None``
    for any other). Without a :class:`RadixsegCache` the attention
    falls back to SDPA with the mask ``sdpa_mask`` would have built from the
    same arguments (:meth:`materialize`).
    """

    __slots__ = (
        "_dense",
        "_kwargs",
        "batch_size",
        "causal",
        "checked",
        "kind",
        "local_size",
        "padding",
        "q_length",
        "q_offset",
    )

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self._kwargs = kwargs
        self._dense: torch.Tensor | None = None
        self.batch_size = int(kwargs["batch_size"])
        self.q_length = int(kwargs["q_length"])
        self.q_offset = int(kwargs.get("q_offset", 0))
        window = kwargs.get("local_size")
        self.local_size: int | None = None if window is None else int(window)
        padding = kwargs.get("attention_mask")
        self.padding: torch.Tensor | None = padding
        custom = bool(kwargs.get("use_vmap")) or not kwargs.get("allow_is_causal_skip", True)
        pad = 0
        if padding is not None and padding.dim() == 2 and padding.shape[0] > 0:
            pad = int((padding[0].cumsum(0) == 0).sum())
        self.kind: str | None = None
        if not custom and int(kwargs.get("kv_offset", 0)) == 0:
            self.kind = _mask_kind(kwargs.get("mask_function", _causal), self.local_size, pad)
        self.causal = self.kind is not None
        self.checked: object = None  # the _Step this mask was last verified against

    def materialize(self) -> torch.Tensor | None:
        """The SDPA mask (``[batch, 1, q, kv]`` bool, or ``None`` for plain causal)."""
        if self._dense is None:
            self._dense = sdpa_mask(**self._kwargs)
        return self._dense


def radixseg_mask(**kwargs: Any) -> _MaskInfo:
    """``AttentionMaskInterface`` entry for ``attn_implementation="radixseg"``.

    Takes the arguments transformers gives every mask function
    (``batch_size``, ``q_length``, ``kv_length``, ``q_offset``, ``kv_offset``,
    ``mask_function``, the 2-D ``attention_mask``, ``local_size``, ...) and
    builds nothing ``[q, kv]``-sized: :func:`radixseg_attention` checks the
    padding against its :class:`RadixsegCache` and computes only real rows.
    """
    return _MaskInfo(kwargs)


# ----- the cache ------------------------------------------------------------------------


class _Step:
    """What one forward pass added: read by every layer and by the attention function.

    ``counts[b]`` new real tokens of row ``b`` (fewer than ``t`` where the step
    covers its left padding); ``rows`` indexes the real ones in the
    ``[batch * t]`` flattening of the step's tokens (``None``: all are real);
    ``active`` the rows with new tokens, which the CSR tables cover.
    """

    __slots__ = (
        "active",
        "consumed",
        "counts",
        "host",
        "kv_indices",
        "kv_indptr",
        "kv_last_page_len",
        "kv_lens",
        "native",
        "qo_indptr",
        "rows",
        "slots",
        "start",
        "t",
        "tables",
    )

    def __init__(
        self,
        start: int,
        t: int,
        counts: list[int],
        kv_lens: list[int],
        slots: Any,
        table: Any,
    ) -> None:
        self.start = start
        self.t = t
        self.counts = counts
        self.kv_lens = kv_lens
        self.active = [b for b, n in enumerate(counts) if n > 0]
        self.slots = slots
        full = all(n == t for n in counts)
        self.rows: torch.Tensor | None = None
        if not full:
            self.rows = torch.cat(
                [
                    torch.arange(b * t + t - n, b * t + t, dtype=torch.int64)
                    for b, n in enumerate(counts)
                ]
            )
        qo = torch.zeros(len(self.active) + 1, dtype=torch.int32)
        torch.cumsum(
            torch.tensor([counts[b] for b in self.active], dtype=torch.int32), 0, out=qo[1:]
        )
        self.qo_indptr = qo
        # Per layer group over a GroupedPrefixCache (group 0: full attention).
        self.tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        if isinstance(table, list):
            self.tables = table
            table = table[0]
        self.kv_indptr, self.kv_indices, self.kv_last_page_len = table
        self.consumed = True
        # Per layer group: the native CPU kernels' validated host arguments,
        # built by the step's first layer and reused by the others.
        self.host: dict[int, _HostTable] = {}
        self.native: bool | None = None  # whether the layers run the native CPU kernels

    def host_table(self, group: int, pool: KVPool) -> _HostTable:
        """The step's page table of layer group ``group`` (0 without groups),
        validated once per step the way :mod:`radixseg.attention` validates
        it (``check=False``: the prefix cache holds these pages), as the
        int64 host arrays the native CPU kernels take."""
        got = self.host.get(group)
        if got is None:
            indptr, indices, last = self.table(group)
            t = _attn._PageTable(
                pool,
                len(self.active),
                indptr,
                _attn._host_index(indptr, "kv_indptr"),
                indices,
                last,
                None,
                False,
            )
            qo = self.qo_indptr.numpy().astype(np.int64)
            got = _HostTable(qo, t.indptr, t.indices, t.kv_lens)
            self.host[group] = got
        return got

    def table(self, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(kv_indptr, kv_indices, kv_last_page_len)`` of layer group ``group``."""
        if self.tables is not None:
            return self.tables[group]
        return self.kv_indptr, self.kv_indices, self.kv_last_page_len


class _HostTable:
    """One step's CSR page table of one pool as int64 host arrays (see
    :meth:`_Step.host_table`): what every layer's native CPU kernel call takes."""

    __slots__ = ("indices", "indptr", "kv_lens", "qo_indptr")

    def __init__(self, qo_indptr: Any, indptr: Any, indices: Any, kv_lens: Any) -> None:
        self.qo_indptr = np.ascontiguousarray(qo_indptr, dtype=np.int64)
        self.indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        self.indices = np.ascontiguousarray(indices, dtype=np.int64)
        self.kv_lens = np.ascontiguousarray(kv_lens, dtype=np.int64)


class _Handle:
    """Attached to the key tensor a layer returns: where the attention reads from.

    ``kv``: the step's real rows of the layer's new K and V (``[N, kv_heads,
    head_dim]``, the order of the attention's query rows), kept for a sharded
    pool, whose collective extend needs them; ``None`` otherwise.
    """

    __slots__ = ("cache", "kv", "layer", "step")

    def __init__(
        self,
        cache: RadixsegCache,
        layer: int,
        step: _Step,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.cache = cache
        self.layer = layer
        self.step = step
        self.kv = kv


class RadixsegLayer(CacheLayerMixin):  # type: ignore[no-untyped-call]
    """One model layer's view of a :class:`RadixsegCache` (``transformers`` layer API).

    ``update(key_states, value_states)`` takes ``[batch, kv_heads, new, head_dim]``
    tensors, writes the real (non-padding) tokens at the slots the cache
    allocated for this step, and returns either the new states tagged for
    ``attn_implementation="radixseg"`` (``attention="segments"``) or the
    gathered ``[batch, kv_heads, seq, head_dim]`` context, each row's KV
    right-aligned and zeros at its left padding (``attention="gather"``).
    Lengths are in the padded batch's positions, as ``DynamicCache`` counts.
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


def _as_matrix(x: Any, what: str, *, bools: bool = False) -> torch.Tensor:
    """``x`` (tensor, array or nested lists; ``[seq]`` for one row) as an int64 ``[batch, seq]``."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, Sequence) and x and isinstance(x[0], Sequence):
        rows = [torch.as_tensor(list(r), dtype=torch.int64) for r in x]
        lens = {r.numel() for r in rows}
        if len(lens) != 1:
            raise InvalidArgument(
                f"rows of {what} have different lengths {sorted(lens)}; pad them on the left and "
                f"pass attention_mask= (or make one cache per length)"
            )
        t = torch.stack(rows)
    else:
        t = torch.as_tensor(x)
    ints = (torch.int32, torch.int64, torch.int16, torch.uint8)
    if t.dtype not in ints and not (bools and t.dtype == torch.bool):
        raise InvalidArgument(f"{what} must hold integers, got {t.dtype}")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise InvalidArgument(f"{what} must be [batch, seq], got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or t.shape[1] < 1:
        raise InvalidArgument(f"{what} must be non-empty, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.int64)


def _as_rows(input_ids: Any) -> list[torch.Tensor]:
    t = _as_matrix(input_ids, "input_ids")
    return [t[i] for i in range(t.shape[0])]


def _left_padding(attention_mask: Any, shape: tuple[int, int]) -> list[int]:
    """Pad tokens at the start of each row of a 2-D 0/1 ``attention_mask``.

    Raises :class:`InvalidArgument` unless the mask has ``shape`` and every
    row is zeros followed by at least one one (left padding).
    """
    m = _as_matrix(attention_mask, "attention_mask", bools=True)
    if tuple(m.shape) != shape:
        raise InvalidArgument(
            f"attention_mask has shape {tuple(m.shape)}; input_ids has {shape} (they must match)"
        )
    bad = (m != 0) & (m != 1)
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise InvalidArgument(f"attention_mask[{b}, {j}] = {int(m[b, j])}; it must hold 0 or 1")
    pads = []
    n = shape[1]
    for b in range(shape[0]):
        real = int(m[b].sum())
        if real == 0:
            raise InvalidArgument(f"attention_mask row {b} is all padding; each row needs a token")
        pad = n - real
        if not bool((m[b, pad:] == 1).all()):
            hole = pad + int((m[b, pad:] == 0).nonzero()[0])
            raise InvalidArgument(
                f"attention_mask row {b} has padding at position {hole} after real tokens; "
                f"RadixsegCache supports left padding only (zeros before the first 1, as "
                f"tokenizers give with padding_side='left'), not right padding or holes"
            )
        pads.append(pad)
    return pads


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
    attention_mask : 0/1 ``[batch, seq]``, optional
        The mask ``generate`` gets, for left-padded batches: row ``b``'s
        leading zeros are padding, which is neither attended to nor stored.
        Right padding and holes raise :class:`InvalidArgument`. A batch with
        padding reuses no cached prefix.
    namespace : int
        Prefixes are shared only within a namespace (a tenant).
    attention : "segments" or "gather"
        ``"segments"`` (default): the model must use
        ``attn_implementation="radixseg"``, which reads the pool in place;
        the cache raises if another attention implementation received its
        states. ``"gather"``: any attention implementation; each layer gets a
        gathered copy of its whole context every step (dequantized). In this
        mode the cache cannot see the model's mask: pass ``attention_mask``
        for padded batches.
    backend : "auto", "triton", "torch" or "cpu"
        :mod:`radixseg.attention` backend (``"auto"``: Triton on CUDA, the
        native kernel for decode steps and torch for prefill on CPU).

    Over a :class:`~radixseg.distributed.ShardedPrefixCache` (context
    parallelism, see :func:`prefix_cache_for`) every call of this cache, and
    every forward pass, is collective: make the same calls on every rank.
    Only ``attention="segments"`` and full-attention layers work there.

    Call :meth:`finish` with ``generate``'s output to keep the prompt and the
    generated tokens cached for later prompts, or :meth:`abort` to drop them;
    the cache is a context manager that aborts on exit if neither was called.
    Works inside and outside ``torch.inference_mode()`` and ``torch.no_grad()``;
    the pool never joins an autograd graph.
    """

    def __init__(
        self,
        prefix_cache: PrefixCache | GroupedPrefixCache,
        input_ids: Any,
        *,
        attention_mask: Any = None,
        namespace: int = 0,
        attention: AttentionMode = "segments",
        backend: Backend = "auto",
    ) -> None:
        if not isinstance(prefix_cache, (PrefixCache, GroupedPrefixCache)):
            raise TypeError(
                f"prefix_cache must be a PrefixCache or GroupedPrefixCache, got "
                f"{type(prefix_cache).__name__}"
            )
        if attention not in ("segments", "gather"):
            raise InvalidArgument(f"attention must be 'segments' or 'gather', got {attention!r}")
        if backend not in ("auto", "triton", "torch", "cpu"):
            raise InvalidArgument(
                f"backend must be 'auto', 'triton', 'torch' or 'cpu', got {backend!r}"
            )
        # (A plain PrefixCache over a ShardedKVPool cannot exist: PrefixCache refuses it.)
        sharded = isinstance(prefix_cache, ShardedPrefixCache)
        if sharded and attention == "gather":
            raise InvalidArgument(
                "attention='gather' is not supported under context parallelism: it would "
                "gather every token on every rank, and each rank holds only its share; use "
                "attention='segments' with attn_implementation='radixseg'"
            )
        self.grouped = isinstance(prefix_cache, GroupedPrefixCache)
        """Whether layer groups keep only their window (a GroupedPrefixCache)."""
        if self.grouped and attention == "gather":
            raise InvalidArgument(
                "attention='gather' is not supported over a GroupedPrefixCache: its windowed "
                "layers no longer hold the tokens outside their window; use attention='segments' "
                "with attn_implementation='radixseg', or prefix_cache_for(..., layer_groups=False)"
            )
        rows = _as_rows(input_ids)
        shape = (len(rows), rows[0].numel())
        pads = [0] * len(rows) if attention_mask is None else _left_padding(attention_mask, shape)
        # Either cache type: the calls below are the same on both (a
        # GroupedPrefixCache returns slots and tables per layer group).
        self.prefix_cache: Any = prefix_cache
        self.pool: Any = prefix_cache.pool
        self.attention = attention
        self.backend = backend
        self.context_parallel = sharded
        """Whether the KV is sharded over ranks (a ShardedPrefixCache): every call is collective."""
        self.namespace = namespace
        self._prompts = rows
        self.padding: list[int] = pads
        """Left-padding tokens of each row (0 for an unpadded row)."""
        self.requests: list[Any] = self._begin(rows, pads, namespace)
        reused = int(self.requests[0].cached_len)
        self.reused_tokens = reused
        """Prompt tokens per row whose KV came from the cache (not prefilled)."""
        self.computed_tokens = 0
        """Positions per row (padding included) this cache stored or skipped: prefill
        of the suffix + decode."""
        self._length = reused
        self._step: _Step | None = None
        self._state = "running"
        self._layers = [RadixsegLayer(self, i, reused) for i in range(self.pool.num_layers)]
        super().__init__(layers=list(self._layers))

    def _begin(self, rows: list[torch.Tensor], pads: list[int], namespace: int) -> list[Any]:
        pc = self.prefix_cache
        reqs: list[Any] = []
        try:
            if any(pads):
                # Real tokens start at different positions per row: no common
                # reusable prefix in the batch's positions. Match nothing.
                for r, p in zip(rows, pads, strict=True):
                    reqs.append(pc.begin(r[p : p + 1], namespace))
                return reqs
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
        """Positions cached per row (reused prefix + everything stored since, padding included)."""
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
        rows = len(self.requests)
        if b != rows and b > rows and b % rows == 0:
            raise InvalidArgument(
                f"layer {layer.layer_idx} got a batch of {b} rows for a cache of {rows}: "
                f"transformers repeats each prompt {b // rows}x for beam search (num_beams) or "
                f"num_return_sequences, which RadixsegCache does not support; use greedy or "
                f"sampling with one sequence per prompt (pass the prompt repeated to sample "
                f"several). Nothing was stored."
            )
        if b != rows or h != pool.num_kv_heads or d != pool.head_dim:
            raise InvalidArgument(
                f"layer {layer.layer_idx} got K of shape {tuple(k.shape)}; this cache holds "
                f"[{rows}, {pool.num_kv_heads}, seq, {pool.head_dim}] "
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
        # [B, H, T, D] -> [B * T, H, D], rows in the slot order of the step;
        # padding positions are dropped.
        kk = k.transpose(1, 2).reshape(b * t, h, d)
        vv = v.transpose(1, 2).reshape(b * t, h, d)
        if step.rows is not None:
            kk = kk.index_select(0, step.rows.to(kk.device))
            vv = vv.index_select(0, step.rows.to(vv.device))
        pool.write(layer.layer_idx, step.slots, kk, vv, check=False)
        layer.length += t
        if self.attention == "gather":
            return self._gather(layer.layer_idx, k.dtype)
        step.consumed = False
        kv = (kk, vv) if self.context_parallel else None
        setattr(k, _HANDLE, _Handle(self, layer.layer_idx, step, kv))
        return k, v

    def _new_step(self, t: int) -> None:
        """Allocate slots for ``t`` new positions per row (before the first layer writes)."""
        pc = self.prefix_cache
        start = self._length
        prompt_len = self._prompts[0].numel()
        if start < prompt_len < start + t:
            raise InvalidArgument(
                f"this forward feeds {t} tokens per row after the {start} the cache holds, past "
                f"the end of the {prompt_len}-token prompt it was made for: after a reused "
                f"prefix, call the model with input_ids[:, cache.get_seq_length():] (generate "
                f"does this itself); nothing was stored"
            )
        grown: list[tuple[Request, int]] = []
        slots = []
        counts = []
        try:
            for req, prompt, pad in zip(self.requests, self._prompts, self.padding, strict=True):
                lo = max(start, pad)
                n = max(0, start + t - lo)
                counts.append(n)
                if n == 0:
                    continue
                toks = prompt[lo : start + t]
                if toks.numel() < n:
                    # Generated tokens are not known to the cache yet: placeholders,
                    # replaced by finish() with the real ones.
                    toks = torch.cat([toks, torch.zeros(n - toks.numel(), dtype=torch.int64)])
                before = req.seq_len
                slots.append(pc.extend(req, toks))
                grown.append((req, before))
        except BaseException:
            for req, seq_len in grown:
                pc.truncate(req, seq_len)  # undo this step's extends
            raise
        active = [self.requests[i] for i, n in enumerate(counts) if n > 0]
        self._length = start + t
        self.computed_tokens += t
        dev = self.pool.device
        if self.grouped:  # one slot tensor per layer group
            step_slots: Any = [
                torch.cat([s[g] for s in slots]).to(dev)
                if slots
                else torch.zeros(0, dtype=torch.int64)
                for g in range(len(self.pool.groups))
            ]
        else:
            step_slots = torch.cat(slots).to(dev) if slots else torch.zeros(0, dtype=torch.int64)
        self._step = _Step(
            start,
            t,
            counts,
            [r.seq_len for r in self.requests],
            step_slots,
            pc.page_table(active),
        )

    def _gather(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, H, length, D]`` K and V: row ``b``'s KV right-aligned, zeros at its padding."""
        pc = self.prefix_cache
        n = self._length
        all_slots = torch.cat([pc.slots(req) for req in self.requests])
        k, v = self.pool.read(layer, all_slots, check=False)
        b, h, d = len(self.requests), self.pool.num_kv_heads, self.pool.head_dim
        if any(self.padding):
            dest = torch.cat(
                [
                    torch.arange(i * n + n - req.seq_len, (i + 1) * n, dtype=torch.int64)
                    for i, req in enumerate(self.requests)
                ]
            ).to(k.device)
            kk = torch.zeros((b * n, h, d), dtype=k.dtype, device=k.device)
            vv = torch.zeros((b * n, h, d), dtype=v.dtype, device=v.device)
            k, v = kk.index_copy_(0, dest, k), vv.index_copy_(0, dest, v)
        # [B, S, H, D] -> [B, H, S, D]
        return (
            k.view(b, n, h, d).transpose(1, 2).to(dtype),
            v.view(b, n, h, d).transpose(1, 2).to(dtype),
        )

    def _check_mask(self, mask: Any, step: _Step, layer: int) -> tuple[str, int | None]:
        """Verify what the model was given for this step; returns the layer's
        pattern (``"causal"``, ``"sliding"``, ``"chunked"``) and its window or chunk."""
        if mask is None:
            if any(self.padding):
                raise InvalidArgument(
                    "the model was given no attention mask, but this RadixsegCache was made with "
                    f"left padding {self.padding}: pass the same attention_mask to generate / "
                    "the model"
                )
            return "causal", None
        if not isinstance(mask, _MaskInfo):
            raise InvalidArgument(
                f"radixseg attention got an attention mask of type {type(mask).__name__} "
                f"{tuple(getattr(mask, 'shape', ()))}; it supports the masks transformers builds "
                f"from a 2-D attention_mask (left padding; causal, sliding-window or chunked), not "
                f"prepared 4-D masks. Use attention='gather' with another implementation."
            )
        if mask.checked is step:
            assert mask.kind is not None
            return mask.kind, mask.local_size
        if mask.kind is None:
            raise InvalidArgument(
                f"layer {layer}'s attention mask is not causal, sliding-window or chunked causal "
                f"with left padding (custom mask functions, bidirectional attention, token-type "
                f"or packed-sequence masks); radixseg attention cannot compute it. Use "
                f"attention='gather' with attn_implementation='sdpa' or 'eager'."
            )
        if (mask.batch_size, mask.q_offset, mask.q_length) != (
            len(self.requests),
            step.start,
            step.t,
        ):
            raise InvalidArgument(
                f"the model's mask covers batch {mask.batch_size}, positions "
                f"{mask.q_offset}..{mask.q_offset + mask.q_length}; this cache's step holds batch "
                f"{len(self.requests)}, positions {step.start}..{step.start + step.t}"
            )
        end = step.start + step.t
        pad = mask.padding
        if pad is None:
            if any(self.padding):
                raise InvalidArgument(
                    f"the model's attention mask has no padding, but this RadixsegCache was made "
                    f"with left padding {self.padding} per row: pass the same attention_mask to "
                    f"generate / the model"
                )
        else:
            want = torch.arange(end, device=pad.device).unsqueeze(0) >= torch.tensor(
                self.padding, device=pad.device
            ).unsqueeze(1)
            got = pad[:, :end].to(torch.bool)
            if got.shape != want.shape or not torch.equal(got, want):
                seen = [int(r.shape[0] - r.sum()) for r in got] if got.shape == want.shape else None
                raise InvalidArgument(
                    f"the model's attention mask disagrees with the padding this RadixsegCache "
                    f"was made with ({self.padding} left-padding tokens per row; the mask holds "
                    f"{seen if seen is not None else tuple(pad.shape)} zeros over the {end} "
                    f"positions so far, or padding after real tokens): pass "
                    f"RadixsegCache(..., attention_mask=) the mask generate gets"
                )
        mask.checked = step
        return mask.kind, mask.local_size

    # ----- lifecycle --------------------------------------------------------------------

    def finish(self, sequences: Any) -> None:
        """Cache every row's real tokens for later prompts, and release the requests.

        ``sequences``: ``generate``'s output ``[batch, prompt + new]`` (or the
        ``.sequences`` of its dict output), padding included. The cache holds
        KV for all but the last generated token; those tokens (whole pages,
        never padding) enter the prefix cache. Raises
        :class:`InvalidArgument`, changing nothing, when a row does not
        continue its prompt.
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
            # The request holds the row's last seq_len positions: never its padding.
            self.prefix_cache.finish(req, tokens=row[n - req.seq_len : n])
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
        """The pool's stats (JSON-exportable; this rank's under context parallelism)
        plus this cache's length and reuse."""
        out = dict(self.pool.stats())
        out.update(
            batch=len(self.requests),
            seq_len=self._length,
            padding=list(self.padding),
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


# ----- the attention function -----------------------------------------------------------


def radixseg_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers`` attention function reading K/V from a :class:`RadixsegCache`.

    ``query``: ``[batch, q_heads, new, head_dim]``; ``key``/``value`` are what
    :class:`RadixsegLayer` returned (the new states, tagged with where the
    step's KV lives); ``attention_mask`` is what :func:`radixseg_mask` built.
    Only real (non-padding) query rows are computed; padding rows of the
    output are zeros. Returns ``([batch, new, q_heads, head_dim], None)``.
    Without a ``RadixsegCache`` (``use_cache=False``, or another cache) it
    falls back to SDPA with the mask transformers' SDPA path would use.
    """
    handle: _Handle | None = getattr(key, _HANDLE, None)
    if handle is None:
        mask = (
            attention_mask.materialize()
            if isinstance(attention_mask, _MaskInfo)
            else attention_mask
        )
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise InvalidArgument(f"radixseg attention is for inference; dropout={dropout} given")
    step = handle.step
    step.consumed = True
    cache = handle.cache
    kind, size = cache._check_mask(attention_mask, step, handle.layer)
    if attention_mask is None and kwargs.get("sliding_window") is not None:
        kind, size = "sliding", int(kwargs["sliding_window"])
    # The kernels mask the window (FlashInfer's inclusive window_left: the
    # last W keys are the query's own and W - 1 before it) or the chunk by
    # position in the request, which starts at the row's first real token, as
    # transformers counts chunks; pages outside are not read.
    pattern: dict[str, Any] = {}
    if kind == "sliding" and size is not None:
        pattern["window_left"] = size - 1
    elif kind == "chunked" and size is not None:
        pattern["chunk_size"] = size
    if kwargs.get("softcap"):
        pattern["logits_soft_cap"] = float(kwargs["softcap"])
    # Attention sinks (gpt-oss's s_aux): one logit per query head in the
    # softmax's denominator only. Exactly a merge with an empty-valued state
    # whose LSE is the sink: out * sigmoid(lse - sink).
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        pattern["sinks"] = "s_aux"
    if pattern and cache.context_parallel:
        raise InvalidArgument(
            f"layer {handle.layer} uses {', '.join(sorted(pattern))}={list(pattern.values())}; "
            f"{_WINDOW_UNDER_CP}"
        )
    b, hq, t, d = query.shape
    q = query.transpose(1, 2).reshape(b * t, hq, d)
    if step.rows is not None:
        q = q.index_select(0, step.rows.to(q.device))
    scale = 1.0 / math.sqrt(d) if scaling is None else float(scaling)
    if not step.active:
        out = q.new_zeros((0, hq, d))
    else:
        common: dict[str, Any] = {
            "sm_scale": scale,
            "backend": cache.backend,
            "check": False,
            **{k: v for k, v in pattern.items() if k != "sinks"},
        }
        if sinks is not None:
            common["return_lse"] = True
        pool: Any = cache.pool
        layer = handle.layer
        group = 0
        if step.tables is not None:
            # A layer group's pool and table; its rows start at the first kept
            # page, a whole number of windows or chunks in (see radixseg.grouped).
            group, layer = cache.pool.locate(handle.layer)
            _check_group(cache.pool.groups[group], kind, size, handle.layer)
            pool = cache.pool.pools[group]
        table = step.table(group)
        decode = all(step.counts[i] == 1 for i in step.active)
        if step.native is None:  # the backend, resolved once per step
            step.native = _native_cpu(cache, pool, q)
        if step.native:
            # The native CPU kernels straight from the step's host arrays: the
            # table was validated once for the step, the query's shape here.
            out = _native_attention(q, pool, layer, step.host_table(group, pool), decode, common)
        elif decode:
            out = _attn.decode(q, pool, layer, *table, **common)
        else:
            if handle.kv is not None:  # sharded: the collective extend takes the new K/V
                common["k"], common["v"] = handle.kv
            out = _attn.extend(q, pool, layer, step.qo_indptr, *table, causal=True, **common)
        if sinks is not None:
            out, lse = out
            sink = sinks.detach().to(device=lse.device, dtype=torch.float32).expand_as(lse)
            out, _ = _attn.merge_states(out, lse, torch.zeros_like(out), sink)
    if step.rows is not None:
        full = out.new_zeros((b * t, hq, d))
        out = full.index_copy_(0, step.rows.to(out.device), out)
    return out.view(b, t, hq, d), None


def _native_cpu(cache: RadixsegCache, pool: Any, q: torch.Tensor) -> bool:
    """Whether this layer's attention runs the native CPU kernels (what
    ``backend="cpu"``, or ``"auto"`` on CPU, resolves to for a plain pool)."""
    if cache.context_parallel or not isinstance(pool, KVPool) or q.device.type != "cpu":
        return False
    return _attn._resolve_backend(cache.backend, q.device) == "cpu"


def _native_attention(
    q: torch.Tensor,
    pool: KVPool,
    layer: int,
    host: _HostTable,
    decode: bool,
    common: dict[str, Any],
) -> Any:
    """:func:`radixseg.attention.decode` / causal ``extend`` on the CPU backend
    with the step's validated host table: ``out``, or ``(out, lse)`` with
    ``common["return_lse"]``."""
    from radixseg.kernels.cpu import paged_decode_cpu, paged_extend_cpu

    q = _attn._check_q(q, pool)
    layer = pool.check_layer(layer)
    window, chunk, cap = _attn._check_local(
        common.get("window_left", -1),
        common.get("chunk_size"),
        common.get("logits_soft_cap"),
        decode=decode,
        causal=True,
    )
    local: dict[str, Any] = {
        "sm_scale": _attn._check_scale(common["sm_scale"], pool.head_dim),
        "window_left": window,
        "chunk_size": chunk,
        "soft_cap": cap,
    }
    if decode:
        out, lse = paged_decode_cpu(
            q, pool, layer, host.indptr, host.indices, host.kv_lens, **local
        )
    else:
        out, lse = paged_extend_cpu(
            q,
            pool,
            layer,
            host.qo_indptr,
            host.indptr,
            host.indices,
            host.kv_lens,
            causal=True,
            **local,
        )
    return (out, lse) if common.get("return_lse") else out


def _check_group(group: Any, kind: str, size: int | None, layer: int) -> None:
    """Refuse a layer whose mask reaches keys its layer group no longer holds."""
    want = {"full": "causal"}.get(group.kind, group.kind)
    if kind != want or (group.span is not None and size != group.span):
        got = kind if size is None else f"{kind} {size}"
        raise InvalidArgument(
            f"layer {layer} attends with a {got} mask, but its layer group is "
            f"{group.describe()} (from the config): its cache keeps only what that mask "
            f"reaches; use prefix_cache_for(..., layer_groups=False) for this model"
        )


def _register() -> None:
    AttentionInterface.register(ATTENTION_NAME, radixseg_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, radixseg_mask)


_register()
