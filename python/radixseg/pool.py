"""KVPool: the bytes behind the page ids, one set of torch tensors per segment.

A :class:`KVPool` starts with no KV memory at all. ``alloc`` adds whole
segments when free pages run short, under an optional byte budget; ``shrink``
retires empty segments and frees their tensors. Pages never move: a page id
names a (segment, page) pair, and a segment's tensors live until the segment
is retired, which the allocator allows only once every page in it is free.

Layout of one segment (all views of one ``uint8`` buffer, so that a segment is
one device allocation and one base address)::

    k        [num_layers, pages_per_segment, page_size, num_kv_heads, head_dim]  dtype
    v        same as k
    k_scale  [num_layers, pages_per_segment, page_size, num_kv_heads]  float32 (FP8 only)
    v_scale  same as k_scale

Token-major pages ("NHD", as SGLang and FlashInfer default to): one token's
heads are contiguous, so a store writes ``num_kv_heads * head_dim`` bytes in a
row and a decode program reading one KV head loads ``head_dim`` contiguous
values per token. Every sub-tensor starts on a 256-byte boundary and holds
fewer than 2**31 elements, so kernels index inside a segment with 32-bit
offsets. :attr:`KVPool.segment_table` holds each segment's four base addresses
for kernels that resolve page id -> segment themselves.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import torch

from radixseg._convert import Uncopyable, as_count
from radixseg._core import (
    BudgetExhausted,
    DeviceOutOfMemory,
    InvalidArgument,
    InvalidHandle,
    OutOfPages,
    RadixsegError,
    SegmentBusy,
)
from radixseg._dtypes import KV_DTYPES, SHORT_NAMES, kv_dtype_named
from radixseg.allocator import SegmentAllocator
from radixseg.layout import SegmentLayout

__all__ = [
    "DEVICE",
    "HOST",
    "DeviceOutOfMemory",  # defined in radixseg._core beside the other errors
    "HostMemoryRefused",
    "KVPool",
    "SegmentTensors",
    "dequantize_fp8",
    "quantize_fp8",
]

#: Largest finite magnitude of each FP8 storage format.
FP8_MAX: dict[torch.dtype, float] = {
    torch.float8_e4m3fn: 448.0,
    torch.float8_e5m2: 57344.0,
}
_STORAGE_DTYPES = tuple(SHORT_NAMES)  # every KV storage dtype, FP8 first
DEFAULT_SEGMENT_BYTES = 64 << 20
_UNCHECKED_GROWTH = 256 << 20

#: Tiers a segment lives in (:meth:`KVPool.tier_of`): the pool's device, or
#: host memory (pinned on CUDA) when the pool has a ``host_budget_bytes``.
DEVICE, HOST = 0, 1
_TIER_NAMES = ("device", "host")


class HostMemoryRefused(RadixsegError):
    """The host tier could not get (or pin) memory for a segment; the segment
    stays where it was. Never a silent fall back to pageable memory."""


class SegmentTensors(NamedTuple):
    """Views of one segment's buffer; ``k_scale``/``v_scale`` are ``None`` unless FP8."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: torch.Tensor | None
    v_scale: torch.Tensor | None


@dataclass(frozen=True)
class _Segment:
    buffer: torch.Tensor  # uint8 [segment_bytes], owns the memory
    views: SegmentTensors
    # [num_layers, pages_per_segment * page_size, heads, head_dim], indexable
    # (uint8 for FP8: torch's index_put has no float8 kernels everywhere).
    k_store: torch.Tensor
    v_store: torch.Tensor
    ks_store: torch.Tensor | None  # [num_layers, pages * page_size, heads]
    vs_store: torch.Tensor | None
    tier: int = DEVICE  # DEVICE or HOST


class AttachedCache(Protocol):
    """What a pool needs from the prefix cache attached to it."""

    def evict(self, n_pages: int) -> int:
        """Release at least ``n_pages`` cached pages if possible; return how many."""
        ...

    def evictable_pages(self) -> int:
        """Pages ``evict`` could release now."""
        ...

    def cache_stats(self) -> dict[str, Any]:
        """Counters merged into :meth:`KVPool.stats`."""
        ...


TensorFactory = Callable[[int, torch.device], torch.Tensor]
_T = TypeVar("_T")


def _default_factory(nbytes: int, device: torch.device) -> torch.Tensor:
    """One segment's buffer. On the CPU (Linux), its own anonymous mapping
    with transparent huge pages requested: attention reads pages scattered
    over whole segments, and 2 MiB pages cut its TLB misses (about 10 % of
    CPU decode time over 1M tokens); unmapping it when the tensor dies hands
    the memory straight back to the OS."""
    if device.type == "cpu" and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError:
            pass
        else:
            with contextlib.suppress(OSError):
                m.madvise(mmap.MADV_HUGEPAGE)
            return torch.frombuffer(m, dtype=torch.uint8)
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _host_factory(nbytes: int, device: torch.device) -> torch.Tensor:
    """One host-tier segment buffer for a pool on ``device``: pinned memory
    for a CUDA pool (so copies run at DMA speed and the CPU kernel reads it in
    place), else what the CPU default factory gives."""
    if device.type == "cuda":
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return _default_factory(nbytes, torch.device("cpu"))


def _normal_tensors() -> torch.inference_mode:
    """Context for tensors that persist across calls (segments, tables): made
    under ``torch.inference_mode()`` they would be inference tensors, which
    refuse in-place updates once the caller leaves inference mode."""
    return torch.inference_mode(False)


def _as_device(device: object) -> torch.device:
    """A device the pool can hold segments on: ``cpu``, or ``cuda[:i]`` that exists."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InvalidArgument(
            f"device={device!r} is not a device name (cpu, cuda, cuda:0): {e}"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise InvalidArgument(
            f"device={device!r}: a KVPool holds its segments on cpu or cuda, not {dev.type}"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise InvalidArgument(f"device={device!r}: CUDA is not available on this machine")
    if dev.index is not None and not 0 <= dev.index < count:
        raise InvalidArgument(
            f"device={device!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}"
        )
    return dev


def _as_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, str):
        named = kv_dtype_named(dtype)
        if named is None:
            raise InvalidArgument(
                f"dtype {dtype!r} is not a KV storage type; use one of {sorted(KV_DTYPES)}"
            )
        return named
    if dtype not in _STORAGE_DTYPES:
        raise InvalidArgument(
            f"dtype {dtype} is not a KV storage type; use one of "
            f"{', '.join(str(d) for d in _STORAGE_DTYPES)}"
        )
    return dtype  # type: ignore[no-any-return]


def quantize_fp8(
    x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x [..., head_dim]`` to FP8 with one float32 scale per row.

    ``scale = amax(|x|) / FP8_MAX`` over the last dimension (448 for e4m3),
    ``q = round_to_nearest_even(clamp(x / scale, -FP8_MAX, FP8_MAX))``; an
    all-zero row gets scale 0 and zeros. Returns ``(q [..., head_dim] dtype,
    scale [...] float32)``. This is the reference the Triton store kernel matches
    bit for bit.

    >>> q, s = quantize_fp8(torch.tensor([[1.0, -2.0, 0.5]]))
    >>> s, q.float()
    (tensor([0.0045]), tensor([[ 224., -448.,  112.]]))
    """
    fmax = FP8_MAX[dtype]
    xf = x.float()
    # Divide by a tensor, not a Python float: CUDA turns division by a host
    # scalar into a multiply by its rounded reciprocal, which misses IEEE
    # division (what the CPU and the Triton store kernel compute) by one ulp in
    # about half of all scales.
    scale = xf.abs().amax(dim=-1) / torch.full((), fmax, device=xf.device)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (xf / safe.unsqueeze(-1)).clamp_(-fmax, fmax).to(dtype)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q [..., head_dim]`` (FP8) times ``scale [...]``, as float32."""
    return q.float() * scale.unsqueeze(-1)


def _device_free_bytes(device: torch.device) -> int:
    """Free memory of ``device`` now: CUDA's free bytes, or the host's MemAvailable."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))


class KVPool(Uncopyable):
    """Paged KV storage that grows and shrinks by whole segments.

    Parameters
    ----------
    num_layers, num_kv_heads, head_dim : int
        Model geometry; one pool serves every layer.
    page_size : int
        Tokens per page, a power of two in ``1..=1024``.
    dtype : torch.dtype or str
        Storage type: ``torch.float8_e4m3fn`` (default; a float32 scale per
        token and KV head), ``float8_e5m2``, ``bfloat16``, ``float16`` or
        ``float32``; names such as ``"fp8"`` or ``"bf16"`` work too.
    device : str or torch.device
        Where segments live.
    segment_bytes : int, optional
        The most bytes per segment (default 64 MiB): pages per segment is the
        largest count whose segment fits in it (``SegmentLayout.pages_fitting``,
        which ``radixseg plan`` uses too). Give this or ``pages_per_segment``,
        not both.
    pages_per_segment : int, optional
        Pages per segment, ``1..=2**20``.
    budget_bytes : int, "auto" or None
        The most bytes the pool may reserve. ``None``: unbounded. ``"auto"``:
        ``budget_fraction`` of (device free memory + what the pool holds),
        evaluated at each growth, so the pool never takes the device's last
        bytes.
    budget_fraction : float
        Used by ``budget_bytes="auto"``, in ``(0, 1]``.
    reserve_segments : int
        Empty segments :meth:`shrink` keeps for the next burst.
    auto_shrink : bool
        Shrink on :meth:`release` once more than ``reserve_segments +
        shrink_hysteresis`` segments are empty (the hysteresis keeps
        alloc/free at a segment boundary from thrashing).
    tensor_factory : callable, optional
        ``factory(nbytes, device) -> uint8 tensor [nbytes]``; the default is
        ``torch.empty``. Tests inject failures here.
    host_budget_bytes : int
        Bytes of host memory the pool may hold in host-tier segments (0, the
        default: no host tier). When the device budget is spent, the coldest
        device segments are demoted there (copied; their page ids do not
        change) before any cached prefix is evicted; :meth:`demote` and
        :meth:`promote` move segments on demand. New pages are only ever
        allocated in device segments. At least one segment's bytes.
    host_tensor_factory : callable, optional
        ``factory(nbytes, device) -> uint8 CPU tensor [nbytes]`` for host-tier
        buffers (default: pinned memory for a CUDA pool); a refusal raises
        :class:`HostMemoryRefused`.

    Thread-safe: ``alloc``/``release`` go straight to the lock-free allocator;
    growth and shrinking take one lock.

    Examples
    --------
    >>> pool = KVPool(num_layers=1, num_kv_heads=2, head_dim=8, page_size=4,
    ...               pages_per_segment=16)
    >>> pool.stats()["reserved_bytes"]
    0
    >>> ids = pool.alloc(3)                      # grows by one segment
    >>> slots = ids.long()[:1] * 4 + torch.arange(4)
    >>> pool.write(0, slots, torch.ones(4, 2, 8), torch.zeros(4, 2, 8))
    >>> k, v = pool.read(0, slots)
    >>> k.shape, bool((k == 1).all())
    (torch.Size([4, 2, 8]), True)
    >>> pool.release(ids); pool.shrink() > 0
    True
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int = 16,
        dtype: torch.dtype | str = torch.float8_e4m3fn,
        device: str | torch.device = "cpu",
        segment_bytes: int | None = None,
        pages_per_segment: int | None = None,
        budget_bytes: int | str | None = None,
        *,
        budget_fraction: float = 0.9,
        reserve_segments: int = 0,
        auto_shrink: bool = False,
        shrink_hysteresis: int = 1,
        max_segments: int | None = None,
        tensor_factory: TensorFactory | None = None,
        host_budget_bytes: int = 0,
        host_tensor_factory: TensorFactory | None = None,
    ) -> None:
        self.num_layers = self._positive(num_layers, "num_layers", 1 << 16)
        self.num_kv_heads = self._positive(num_kv_heads, "num_kv_heads", 1 << 16)
        self.head_dim = self._positive(head_dim, "head_dim", 1 << 16)
        self.dtype = _as_dtype(dtype)
        self.device = _as_device(device)
        self.fp8 = self.dtype in FP8_MAX
        self._elem = torch.empty(0, dtype=self.dtype).element_size()
        ps = as_count(page_size, "page_size")
        if ps < 1 or ps > 1024 or ps & (ps - 1):
            raise InvalidArgument(f"page_size must be a power of two in 1..=1024, got {ps}")
        self.page_size = ps

        # Bytes of one page across layers: K and V, plus their scales for FP8.
        per_token = self.num_kv_heads * (2 * self.head_dim * self._elem + (8 if self.fp8 else 0))
        self.page_bytes = self.num_layers * ps * per_token
        geometry = (self.num_layers, self.num_kv_heads, self.head_dim, ps)
        pps_limit = SegmentLayout.max_pages(*geometry)
        if pps_limit < 1:
            elems_per_page = self.num_layers * ps * self.num_kv_heads * self.head_dim
            raise InvalidArgument(
                f"one page holds {elems_per_page:,} elements per tensor, past the "
                f"2**31 - 1 a segment allows; lower num_layers, page_size or head_dim"
            )
        if segment_bytes is not None and pages_per_segment is not None:
            raise InvalidArgument(
                f"give segment_bytes ({segment_bytes}) or pages_per_segment "
                f"({pages_per_segment}), not both"
            )
        if pages_per_segment is not None:
            pps = as_count(pages_per_segment, "pages_per_segment")
            if not 1 <= pps <= pps_limit:
                raise InvalidArgument(
                    f"pages_per_segment must be in 1..={pps_limit:,} for this geometry "
                    f"(2**31 elements per tensor, 2**20 pages), got {pps:,}"
                )
        else:
            sb = (
                DEFAULT_SEGMENT_BYTES
                if segment_bytes is None
                else as_count(segment_bytes, "segment_bytes")
            )
            pps = SegmentLayout.pages_fitting(sb, *geometry, self._elem, self.fp8)
            if pps < 1:
                one = SegmentLayout(*geometry, 1, self._elem, self.fp8).segment_bytes
                raise InvalidArgument(
                    f"segment_bytes={sb:,} is smaller than one page (a one-page segment takes "
                    f"{one:,} B: {self.num_layers} layers x {ps} tokens x {per_token:,} B, "
                    f"each part 256-byte aligned)"
                )
        self.pages_per_segment = pps

        #: Where every byte of a segment lives (one description for the views
        #: below, the Triton launchers and the native CPU kernel).
        self.layout = SegmentLayout(*geometry, pps, self._elem, self.fp8)
        self.segment_bytes = self.layout.segment_bytes

        if isinstance(budget_bytes, str) and budget_bytes != "auto":
            raise InvalidArgument(
                f"budget_bytes must be an int, 'auto' or None, got {budget_bytes!r}"
            )
        if budget_bytes is not None and budget_bytes != "auto":
            budget_bytes = as_count(budget_bytes, "budget_bytes")
        if isinstance(budget_fraction, bool) or not isinstance(
            budget_fraction, (int, float, np.floating, np.integer)
        ):
            raise TypeError(
                f"budget_fraction must be a number in (0, 1], got "
                f"{type(budget_fraction).__name__}: {budget_fraction!r}"
            )
        if not 0.0 < float(budget_fraction) <= 1.0:
            raise InvalidArgument(f"budget_fraction must be in (0, 1], got {budget_fraction}")
        self.budget_bytes: int | str | None = budget_bytes
        self.budget_fraction = float(budget_fraction)
        self.reserve_segments = as_count(reserve_segments, "reserve_segments")
        self.shrink_hysteresis = as_count(shrink_hysteresis, "shrink_hysteresis")
        self.auto_shrink = bool(auto_shrink)

        self.allocator = SegmentAllocator(self._tokens_per_page_id(ps), pps, max_segments)
        self._factory: TensorFactory = tensor_factory or _default_factory
        self._segments: list[_Segment | None] = []
        # uint8 numpy views of the segment buffers (CPU pools), rebuilt after
        # any segment is added or retired; see host_buffers.
        self._host: list[Any] | None = None
        self._lock = threading.RLock()
        # Held by a segment move from its copy to its switch, and by writes
        # while the pool has a host tier: a write never lands in a buffer
        # that a move has already copied and is about to drop. Reentrant, as
        # the growth lock: an interrupt landing exactly on a `with` exit
        # leaves it held, and the interrupted thread can still use the pool.
        self._moves = threading.RLock()
        self._pid = os.getpid()
        self._cache: AttachedCache | None = None
        # (budget, segment count) when an allocation found the budget spent.
        self._budget_spent: tuple[int, int] | None = None
        with _normal_tensors():
            self._table = torch.zeros((0, 4), dtype=torch.int64, device=self.device)
        self._released_since_check = 0
        self._counters = {
            "segments_added": 0,
            "segments_retired": 0,
            "growth_failures": 0,
            "evicted_pages": 0,
            "peak_reserved_bytes": 0,
            "demotions": 0,
            "promotions": 0,
            "demoted_bytes": 0,
            "promoted_bytes": 0,
        }
        self.host_budget_bytes = as_count(host_budget_bytes, "host_budget_bytes")
        if 0 < self.host_budget_bytes < self.segment_bytes:
            raise InvalidArgument(
                f"host_budget_bytes={self.host_budget_bytes:,} is smaller than one segment "
                f"({self.segment_bytes:,} B); give 0 (no host tier) or at least one segment"
            )
        self._host_factory: TensorFactory = host_tensor_factory or _host_factory
        # Segment ids whose segment lives in the host tier, and a uint8 tier
        # per segment id for vectorised page -> tier lookups (tier_of).
        self._host_sids: set[int] = set()
        self._tiers = np.zeros(0, dtype=np.uint8)
        # Host buffers of segments promoted or retired, kept for the next
        # demotion (pinning is slow: never pin per move); shrink() frees them.
        self._host_spares: list[torch.Tensor] = []
        # Per segment id: the demotion round at which running requests last
        # read it (the recency key of the demotion order).
        self._last_read: dict[int, int] = {}
        self._rounds = 0

    # ----- configuration helpers --------------------------------------------------

    def _tokens_per_page_id(self, page_size: int) -> int:
        """Tokens one page id stands for in the allocator and the radix tree: the
        stored page here; a :class:`radixseg.distributed.ShardedKVPool` stores
        ``page_size`` of the ``page_size * ranks`` tokens of a virtual page."""
        return page_size

    @staticmethod
    def _positive(x: Any, what: str, limit: int) -> int:
        n = as_count(x, what)
        if not 1 <= n <= limit:
            raise InvalidArgument(f"{what} must be in 1..={limit:,}, got {n:,}")
        return n

    @property
    def tokens_per_segment(self) -> int:
        """``pages_per_segment * page_size``."""
        return self.pages_per_segment * self.page_size

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers (scales included)."""
        return self.page_bytes // self.page_size

    @property
    def strides(self) -> dict[str, int]:
        """Element strides of ``k``/``v`` inside every segment (the same for all).

        Keys ``layer``, ``page``, ``token``, ``head``; ``scale_layer``,
        ``scale_page``, ``scale_token`` for the ``[L, pages, page_size, heads]``
        scale tensors (their head stride is 1).
        """
        return self.layout.strides

    def attach_cache(self, cache: AttachedCache | None) -> None:
        """Attach the prefix cache whose pages ``alloc`` may evict under pressure.

        :class:`radixseg.PrefixCache` attaches itself; a pool has at most one.
        """
        if cache is not None and self._cache is not None and cache is not self._cache:
            raise InvalidArgument(
                "this pool already has a PrefixCache attached; one pool serves one cache"
            )
        self._cache = cache

    # ----- segments ---------------------------------------------------------------

    def _make_segment(self, buffer: torch.Tensor, tier: int = DEVICE) -> _Segment:
        if buffer.dtype != torch.uint8 or buffer.numel() < self.segment_bytes or buffer.dim() != 1:
            raise InvalidArgument(
                f"tensor_factory must return a 1-D uint8 tensor of at least "
                f"{self.segment_bytes:,} bytes, got {buffer.dtype} {tuple(buffer.shape)}"
            )
        if buffer.data_ptr() % 16:
            raise InvalidArgument(
                f"segment buffers must be 16-byte aligned for vector loads, got "
                f"address {buffer.data_ptr():#x}"
            )
        L, pps, ps = self.num_layers, self.pages_per_segment, self.page_size
        h, d = self.num_kv_heads, self.head_dim
        store_dtype = torch.uint8 if self.fp8 else self.dtype
        shape = (L, pps, ps, h, d)

        def sub(offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
            return buffer[offset : offset + nbytes].view(dtype)

        lay = self.layout
        k_off, v_off, ks_off, vs_off = lay.offsets
        k_raw = sub(k_off, lay.kv_bytes, store_dtype)
        v_raw = sub(v_off, lay.kv_bytes, store_dtype)
        k_store = k_raw.view(L, pps * ps, h, d)
        v_store = v_raw.view(L, pps * ps, h, d)
        if self.fp8:
            ks = sub(ks_off, lay.scale_bytes, torch.float32)
            vs = sub(vs_off, lay.scale_bytes, torch.float32)
            views = SegmentTensors(
                k_raw.view(self.dtype).view(shape),
                v_raw.view(self.dtype).view(shape),
                ks.view(L, pps, ps, h),
                vs.view(L, pps, ps, h),
            )
            return _Segment(
                buffer,
                views,
                k_store,
                v_store,
                ks.view(L, pps * ps, h),
                vs.view(L, pps * ps, h),
                tier,
            )
        views = SegmentTensors(k_raw.view(shape), v_raw.view(shape), None, None)
        return _Segment(buffer, views, k_store, v_store, None, None, tier)

    def _install(self, sid: int, seg: _Segment | None) -> None:
        """Put ``seg`` (or nothing) at slot ``sid`` and refresh its table row."""
        if sid >= len(self._segments):
            self._segments.extend([None] * (sid + 1 - len(self._segments)))
        if sid >= self._tiers.shape[0]:
            tiers = np.zeros(max(16, 2 * self._tiers.shape[0], sid + 1), dtype=np.uint8)
            tiers[: self._tiers.shape[0]] = self._tiers
            self._tiers = tiers
        self._segments[sid] = seg
        tier = DEVICE if seg is None else seg.tier
        self._tiers[sid] = tier
        if tier == HOST:
            self._host_sids.add(sid)
        else:
            self._host_sids.discard(sid)
        self._host = None
        if sid >= self._table.shape[0]:
            cap = max(16, 2 * self._table.shape[0], sid + 1)
            with _normal_tensors():
                table = torch.zeros((cap, 4), dtype=torch.int64, device=self.device)
            table[: self._table.shape[0]] = self._table
            self._table = table
        if seg is None:
            self._table[sid] = 0
        else:
            k, v, ks, vs = seg.views
            row = [
                k.data_ptr(),
                v.data_ptr(),
                ks.data_ptr() if ks is not None else 0,
                vs.data_ptr() if vs is not None else 0,
            ]
            self._table[sid] = torch.tensor(row, dtype=torch.int64)

    def _grow(self, n_segments: int) -> list[int]:
        """Add ``n_segments`` segments, all or none; returns their ids. Caller holds the lock."""
        buffers: list[torch.Tensor] = []
        try:
            # Segments outlive the call: make them normal tensors (not inference
            # tensors, not in any autograd graph) whatever mode the caller is in.
            with _normal_tensors():
                for _ in range(n_segments):
                    buffers.append(self._factory(self.segment_bytes, self.device).detach())
                segs = [self._make_segment(b) for b in buffers]
        except (RuntimeError, MemoryError, OSError) as e:
            # The device (or the host) refused the memory: torch.OutOfMemoryError
            # is a RuntimeError, mmap failures are OSErrors. Anything else (an
            # interrupt, a bug) propagates as itself.
            self._counters["growth_failures"] += 1
            raise _GrowthFailed(len(buffers), e) from e
        added: list[int] = []
        try:
            self._open_segments(segs, added)
            self._counters["peak_reserved_bytes"] = max(
                self._counters["peak_reserved_bytes"], self.reserved_bytes()
            )
            return added
        except BaseException:
            # All or none, whichever line the exception (IdSpaceExhausted, an
            # interrupt) landed on.
            self._abandon_growth(added)
            raise

    def _open_segments(self, segs: list[_Segment], ids: list[int]) -> None:
        """Add each of ``segs`` in two phases, appending its id to ``ids``: the id
        is reserved (closed) before the tensors go in under it, and its pages
        become allocatable only once they are. (A loop of its own: in CPython
        3.11 an exception raised on a loop's head can miss a ``try`` around the
        loop in the same function; the caller's ``try`` still catches it.)"""
        for seg in segs:
            ids.append(self.allocator.reserve_segment())
            self._install(ids[-1], seg)
            self.allocator.open_segment(ids[-1])
            self._counters["segments_added"] += 1

    def _abandon_growth(self, ids: list[int]) -> None:
        """Undo a ``_grow`` that raised: cancel its reservations, taking out their
        tensors, and retire the segments it opened. Caller holds the lock."""
        # Under the lock every reservation of this pool's allocator is this
        # growth's, including one whose id an exception kept from ``ids``.
        reserved = self.allocator.reserved_segments()
        for sid in reserved:
            self._install(sid, None)
            self.allocator.cancel_segment(sid)
        self._retire([sid for sid in ids if sid not in reserved])

    def room_segments(self, need: int | None = None) -> int:
        """Segments the budget and the allocator's id space still allow.

        With no budget, the device's free memory caps the room too: always
        when ``need`` is None (the room as a census, as the SGLang adapter's
        ``available_size`` reports it), and for a growth of ``need`` segments
        only past 256 MiB, so an absurd request fails at once instead of
        allocating segment after segment until the device refuses.
        """
        live = self.allocator.segment_count()
        room = self.allocator.max_segments - live
        reserved = self.device_reserved_bytes()
        budget = self.resolved_budget(reserved)
        if budget is not None:
            room = min(room, max(0, (budget - reserved) // self.segment_bytes))
        elif need is None or need * self.segment_bytes > _UNCHECKED_GROWTH:
            room = min(room, _device_free_bytes(self.device) // self.segment_bytes)
        return room

    @property
    def segment_events(self) -> int:
        """Segments added plus segments retired since the pool was built: changes
        exactly when the pool grows or shrinks (a cheap stamp for figures, such
        as :meth:`room_segments`, that are kept until then)."""
        return self._counters["segments_added"] + self._counters["segments_retired"]

    def resolved_budget(self, reserved: int | None = None) -> int | None:
        """The device budget in bytes now (``"auto"`` evaluated against free
        device memory); ``reserved``: the device bytes the pool holds."""
        if self.budget_bytes is None:
            return None
        if self.budget_bytes == "auto":
            if reserved is None:
                reserved = self.device_reserved_bytes()
            return int(self.budget_fraction * (_device_free_bytes(self.device) + reserved))
        assert isinstance(self.budget_bytes, int)
        return self.budget_bytes

    def segment(self, segment_id: int) -> SegmentTensors:
        """The tensors of a live segment (for backends that take one tensor per launch)."""
        sid = as_count(segment_id, "segment_id")
        seg = self._segments[sid] if sid < len(self._segments) else None
        if seg is None:
            raise InvalidArgument(
                f"segment {sid} is not live; live segments: {self.allocator.segments()}"
            )
        return seg.views

    def host_buffers(self) -> list[Any]:
        """Per segment id, a ``uint8`` numpy view of the segment's whole buffer
        (``None`` for a free slot): what the native CPU kernels read, with
        :attr:`layout`'s offsets. Every segment of a CPU pool; on a CUDA pool
        the host-tier segments only (``None`` for device ones). Take it once
        per launch."""
        host = self._host  # one read: the list of the segments live at this launch
        if host is None:
            # Built and published under the growth lock, so a segment retired and
            # re-added meanwhile (same id, new buffer) cannot leave a stale list
            # published after _install cleared it.
            with self._locked():
                host = self._host
                if host is None:
                    host = [
                        None if s is None or s.buffer.device.type != "cpu" else s.buffer.numpy()
                        for s in self._segments
                    ]
                    self._host = host
        return host

    @property
    def segment_table(self) -> torch.Tensor:
        """``int64 [capacity, 4]`` on the pool's device: per segment id, the base
        addresses of ``k``, ``v``, ``k_scale``, ``v_scale`` (0: no segment / no scales).

        Rows change when segments are added or retired; the tensor itself is
        reallocated (doubling) when a segment id passes its capacity, so read
        this property at each launch rather than caching it.
        """
        return self._table

    # ----- pages ------------------------------------------------------------------

    def alloc(self, n_pages: Any) -> torch.Tensor:
        """Allocate ``n_pages`` pages, all or none: ``int32 [n_pages]`` page ids.

        Adds whole segments when free pages are short. When the budget (or the
        device) refuses, asks the attached evictor (a :class:`PrefixCache`)
        to release cached pages and retries; raises :class:`BudgetExhausted`
        or :class:`DeviceOutOfMemory` when that frees nothing. Nothing changes
        on failure, except cache eviction.
        """
        n = as_count(n_pages, "n_pages")
        try:
            return self.allocator.alloc(n)
        except OutOfPages:
            pass
        return self._alloc_with(n, lambda: self.allocator.alloc(n))

    def _eviction_point(self) -> int:
        """The segment count at which an allocation last found the (fixed)
        budget spent, while the budget is unchanged; else -1. At that count a
        shortfall can only be met by eviction, so the request path evicts in
        the same core call as its allocation instead of coming here."""
        spent = self._budget_spent
        if self.host_budget_bytes:
            return -1  # demotion comes before eviction: always through _make_room
        if spent is not None and spent[0] == self.budget_bytes:
            return spent[1]
        return -1

    def _alloc_with(self, n: int, take: Callable[[], _T], *, tried: bool = False) -> _T:
        """Make room for ``n`` pages and call ``take`` (which allocates them, raising
        ``OutOfPages`` when they are not free): growing by segments, evicting
        under pressure, retrying ``take`` after each step (``tried``: the caller
        just found the pages short, so the first step makes room). All or
        nothing: the segments this call added are retired again when it fails."""
        with self._locked():
            return self._alloc_slow(n, take, tried)

    def _alloc_slow(self, n: int, take: Callable[[], _T], tried: bool = False) -> _T:
        added: list[int] = []
        try:
            return self._make_room(n, take, added, tried)
        except _NoRoom as e:
            short = e
        except BaseException:
            self._retire(added)  # an interrupt, or take() or evict() raising
            raise
        # Give back what this call added, so a failure changes nothing.
        self._retire(added)
        # The shortfall now, with this call's growth given back (the loop's
        # last figure was taken with it).
        need = max(
            short.need, -(-max(1, n - self.allocator.free_pages()) // self.pages_per_segment)
        )
        raise self._exhausted(n, need, self.room_segments(need), short.failure)

    def _make_room(self, n: int, take: Callable[[], _T], added: list[int], tried: bool) -> _T:
        """The loop of :meth:`_alloc_slow` (a function of its own so that an
        exception on its head reaches the caller's ``except``): grow, evict,
        retry ``take``; ids of added segments go to ``added``. Raises
        :class:`_NoRoom` when neither can make room."""
        pps = self.pages_per_segment
        failure: _GrowthFailed | None = None
        while True:
            # ``tried``: skip the first take unless pages were freed meanwhile.
            if not tried or self.allocator.free_pages() >= n:
                try:
                    return take()
                except OutOfPages:
                    pass
            tried = False
            short = max(1, n - self.allocator.free_pages())
            need = -(-short // pps)
            room = self.room_segments(need)
            if room == 0 and isinstance(self.budget_bytes, int):
                # Growth is over until the segment count or the budget changes.
                self._budget_spent = (self.budget_bytes, self.allocator.segment_count())
            if room < need and failure is None and self._demote_for(need - room, added):
                continue  # the device budget has room again: grow into it
            evictable = self._cache.evictable_pages() if self._cache is not None else 0
            if short > room * pps + evictable:
                break  # growth and eviction together cannot cover it: fail now
            if room > 0 and failure is None:
                try:
                    added += self._grow(min(need, room))
                    continue
                except _GrowthFailed as e:
                    failure = e
            if self._cache is not None:
                released = self._cache.evict(short)
                if released > 0:
                    self._counters["evicted_pages"] += released
                    failure = None
                    continue
            break
        raise _NoRoom(need, failure)

    def _retire(self, sids: list[int]) -> int:
        """Retire the empty segments among ``sids``; returns bytes freed. Caller holds the lock."""
        freed = 0
        for sid in sids:
            try:
                self.allocator.retire_segment(sid)
                seg = self._segments[sid]
                self._install(sid, None)
                if seg is not None and seg.tier == HOST:
                    self._host_spares.append(seg.buffer)  # pinned once, used again
            except SegmentBusy:
                continue  # a concurrent alloc took a page meanwhile
            except BaseException:
                # Interrupted after the retire: its tensors must go with it.
                if not self.allocator.is_live(sid):
                    self._install(sid, None)
                raise
            self._counters["segments_retired"] += 1
            freed += self.segment_bytes
        return freed

    def _exhausted(self, n: int, need: int, room: int, failure: _GrowthFailed | None) -> OutOfPages:
        free = self.allocator.free_pages()
        reserved = self.device_reserved_bytes()
        budget = self.resolved_budget(reserved)
        err: OutOfPages
        if failure is not None:
            err = DeviceOutOfMemory(
                f"cannot allocate {n:,} pages: {free:,} free and the device refused a new "
                f"{self.segment_bytes:,}-byte segment ({failure.cause!r}); the pool holds "
                f"{reserved:,} B in {self.allocator.segment_count():,} segments and "
                f"eviction freed nothing; lower segment_bytes or free device memory"
            )
        elif (
            budget is None and self.allocator.max_segments - self.allocator.segment_count() >= need
        ):
            err = DeviceOutOfMemory(
                f"cannot allocate {n:,} pages ({n * self.page_bytes:,} B): {free:,} free, and "
                f"the {need:,} segments of {self.segment_bytes:,} B it needs exceed the "
                f"device's free memory ({_device_free_bytes(self.device):,} B); lower the request "
                f"or free device memory"
            )
        elif budget is None or room >= need:
            err = BudgetExhausted(
                f"cannot allocate {n:,} pages: {free:,} free and the allocator's id space "
                f"allows {room:,} more segments of the {need:,} needed "
                f"(max_segments={self.allocator.max_segments:,}); "
                f"raise max_segments or pages_per_segment"
            )
        else:
            knob = (
                "raise budget_fraction or free device memory"
                if self.budget_bytes == "auto"
                else "raise budget_bytes"
            )
            host = ""
            if self.host_budget_bytes:
                host = (
                    f"; the host tier holds {self.host_reserved_bytes():,} B of its "
                    f"{self.host_budget_bytes:,} B budget and no device segment could move "
                    f"there (each running request's last page stays on the device)"
                )
                knob += " or host_budget_bytes"
            err = BudgetExhausted(
                f"cannot allocate {n:,} pages ({n * self.page_bytes:,} B): {free:,} pages free, "
                f"{reserved:,} B reserved on the device in {reserved // self.segment_bytes:,} "
                f"segments of {self.segment_bytes:,} B, device budget {budget:,} B allows "
                f"{room} more segment(s) and {need} are needed; eviction freed nothing{host}; "
                f"{knob}"
            )
        if failure is not None:
            err.__cause__ = failure.cause
        # The same attributes the core's OutOfPages carries, plus the bytes.
        attrs = {
            "requested": n,
            "available": free,
            "reserved_bytes": reserved,
            "budget_bytes": budget,
        }
        for name, value in attrs.items():
            setattr(err, name, value)
        return err

    def retain(self, ids: Any) -> None:
        """Add one reference to each page in ``ids``; all or none."""
        self.allocator.retain(ids)

    def release(self, ids: Any) -> None:
        """Drop one reference from each page in ``ids``; all or none.

        With ``auto_shrink``, retires empty segments past the reserve and
        hysteresis afterwards.
        """
        self.allocator.release(ids)
        if self.auto_shrink:
            self._released_since_check += len(ids)
            if self._released_since_check >= self.pages_per_segment:
                self._released_since_check = 0
                slack = self.reserve_segments + self.shrink_hysteresis
                if self.allocator.free_pages() > slack * self.pages_per_segment:
                    empty = sum(1 for _, used in self.allocator.segment_usage() if used == 0)
                    if empty > slack:
                        self.shrink()

    def shrink(self, keep: int | None = None) -> int:
        """Retire empty segments, keeping ``keep`` (default ``reserve_segments``)
        empty ones; returns the bytes freed.

        Highest segment ids go first (allocation fills low ids first, so high
        segments are the ones that drain). On CUDA the freed blocks are handed
        back to the driver with ``torch.cuda.empty_cache()``.
        """
        keep = self.reserve_segments if keep is None else as_count(keep, "keep")
        with self._locked():
            empty = sorted(
                (s for s, used in self.allocator.segment_usage() if used == 0), reverse=True
            )
            spares = len(self._host_spares)  # retired host segments' buffers join them
            freed = self._retire(empty[: max(0, len(empty) - keep)])
            freed += spares * self.segment_bytes
            self._host_spares.clear()
        if freed and self.device.type == "cuda":
            torch.cuda.empty_cache()
        return freed

    # ----- bytes ------------------------------------------------------------------

    def _locked(self) -> threading.RLock:
        """The growth lock, refused in a process forked after the pool was made:
        a parent thread may have held it at the fork and never lets go here."""
        if os.getpid() != self._pid:
            raise InvalidArgument(
                "this KVPool was created before os.fork() in the parent process and cannot "
                "be used in the forked child (its lock may be held by a parent thread that "
                "does not exist here); create a new KVPool in the child"
            )
        return self._lock

    def check_layer(self, layer: Any) -> int:
        """``layer`` as a Python int in ``0..num_layers``, else a typed error (the
        one check every pool-taking call uses: write, read, attention)."""
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        index = int(layer)
        if not 0 <= index < self.num_layers:
            raise InvalidArgument(f"layer {index} is out of range 0..{self.num_layers - 1}")
        return index

    def check_slots(self, given: Any, check: bool = True) -> torch.Tensor:
        """``given`` as a 1-D ``int64`` tensor of slots; with ``check``, every slot
        must lie in a page somebody holds (a host sync). Typed errors otherwise."""
        slots: torch.Tensor
        if isinstance(given, torch.Tensor):
            slots = given
        else:
            try:
                slots = torch.as_tensor(given, dtype=torch.int64)
            except (TypeError, ValueError, RuntimeError, OverflowError) as e:
                raise TypeError(f"slots must be a 1-D integer tensor or sequence: {e}") from None
        if slots.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"slots must be int64 or int32, got {slots.dtype}")
        if slots.dim() != 1:
            raise InvalidArgument(f"slots must be 1-D [T], got shape {tuple(slots.shape)}")
        slots = slots.to(torch.int64)
        if check and slots.numel():
            lo = int(slots.min())
            if lo < 0:
                raise InvalidArgument(f"slot {lo} is negative")
            pages = torch.unique_consecutive(slots // self.page_size).cpu()
            try:
                rc = self.allocator.refcount(pages)
            except InvalidHandle as e:
                raise InvalidHandle(f"slots (page_id * {self.page_size} + offset): {e}") from None
            free = (rc == 0).nonzero()
            if free.numel():
                page = int(pages[int(free[0])])
                raise InvalidHandle(
                    f"slots {page * self.page_size}..{(page + 1) * self.page_size - 1} are in "
                    f"page {page}, which is not allocated (refcount 0); write and read only "
                    f"pages you hold a reference to"
                )
        return slots

    def check_kv(self, x: Any, n: int, what: str = "k") -> torch.Tensor:
        """``x`` must be a float tensor ``[n, num_kv_heads, head_dim]`` on the pool's
        device; returned as given, else a typed error naming ``what``."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        want = (n, self.num_kv_heads, self.head_dim)
        if tuple(x.shape) != want:
            raise InvalidArgument(
                f"{what} must have shape [T, num_kv_heads, head_dim] = {list(want)}, "
                f"got {list(x.shape)}"
            )
        if not x.dtype.is_floating_point:
            raise TypeError(f"{what} must be a floating tensor, got {x.dtype}")
        if x.device != self.device and not (
            x.device.type == self.device.type and self.device.index is None
        ):
            raise InvalidArgument(f"{what} is on {x.device}, the pool on {self.device}")
        return x

    def _check_finite(
        self, layer: int, slots: torch.Tensor, what: str, x: torch.Tensor, stored: torch.Tensor
    ) -> None:
        """Refuse ``x`` (``[T, H, D]``) when a token holds inf/NaN, or when ``stored``
        (what the storage type makes of it: the values, or FP8's scales) does."""
        given_ok = torch.isfinite(x).flatten(1).all(1)
        stored_ok = torch.isfinite(stored).flatten(1).all(1)
        if bool((given_ok & stored_ok).all()):
            return
        bad = int((~(given_ok & stored_ok)).nonzero()[0, 0])
        where = f"layer {layer}: {what}[{bad}] (slot {int(slots[bad])})"
        if not bool(given_ok[bad]):
            raise InvalidArgument(f"{where} holds inf or NaN; the pool stores finite values only")
        top = torch.finfo(self.dtype).max
        raise InvalidArgument(
            f"{where} holds {float(x[bad].abs().max()):.6g}, past what {self.dtype} can store "
            f"(largest finite {top:.6g}); nothing was written"
        )

    def _groups(
        self, slots: torch.Tensor
    ) -> list[tuple[_Segment, torch.Tensor, torch.Tensor | None]]:
        """Split slots by segment: ``(segment, offsets in it, positions in slots or None)``."""
        seg_ids, within = self.layout.split_slot(slots)
        lo, hi = int(seg_ids.min()), int(seg_ids.max())
        if lo == hi:
            return [(self._live_segment(lo), within, None)]
        out = []
        for sid in torch.unique(seg_ids).tolist():
            pos = (seg_ids == sid).nonzero().squeeze(1)
            out.append((self._live_segment(sid), within[pos], pos))
        return out

    def _live_segment(self, sid: int) -> _Segment:
        seg = self._segments[sid] if 0 <= sid < len(self._segments) else None
        if seg is None:
            raise InvalidHandle(f"slot points into segment {sid}, which is not live")
        return seg

    def write(
        self, layer: int, slots: Any, k: torch.Tensor, v: torch.Tensor, *, check: bool = True
    ) -> None:
        """Store ``k``, ``v`` (``[T, num_kv_heads, head_dim]``, any float dtype) at ``slots``.

        ``slots`` is ``int64 [T]`` (``page_id * page_size + offset``). FP8
        pools quantize with one float32 scale per (token, KV head), see
        :func:`quantize_fp8`. ``check`` validates that every slot is in an
        allocated page and that values are finite (a host sync; engines on the
        hot path may pass ``check=False``). All or nothing.
        """
        layer = self.check_layer(layer)
        slots = self.check_slots(slots, check)
        # The pool stores values, never autograd history: detach, so a write in
        # grad mode neither gives the segments a grad_fn nor trips autograd's
        # checks on views made in no_grad mode.
        k = self.check_kv(k, slots.numel(), "k").detach()
        v = self.check_kv(v, slots.numel(), "v").detach()
        if slots.numel() == 0:
            return
        if self.fp8:
            kq, ks = quantize_fp8(k, self.dtype)
            vq, vs = quantize_fp8(v, self.dtype)
            if check:
                self._check_finite(layer, slots, "k", k, ks)
                self._check_finite(layer, slots, "v", v, vs)
            kq, vq = kq.view(torch.uint8), vq.view(torch.uint8)
        else:
            kq, vq, ks, vs = k.to(self.dtype), v.to(self.dtype), k, v
            if check:
                self._check_finite(layer, slots, "k", k, kq)
                self._check_finite(layer, slots, "v", v, vq)
        slots = slots.to(self.device)
        with self._moves if self.host_budget_bytes else contextlib.nullcontext():
            self._write_groups(layer, slots, kq, vq, ks, vs)

    def _write_groups(
        self,
        layer: int,
        slots: torch.Tensor,
        kq: torch.Tensor,
        vq: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
    ) -> None:
        """The stores of :meth:`write`, segment by segment (``ks``, ``vs``:
        the FP8 scales, stored only by FP8 segments)."""
        for seg, at, pos in self._groups(slots):
            # A host-tier segment of a CUDA pool (a page written again after
            # its segment moved: new pages are always on the device).
            where = seg.k_store.device

            def sel(
                t: torch.Tensor, pos: torch.Tensor | None = pos, where: torch.device = where
            ) -> torch.Tensor:
                t = t if pos is None else t.index_select(0, pos)
                return t if t.device == where else t.to(where)

            if at.device != where:
                at = at.to(where)
            seg.k_store[layer].index_copy_(0, at, sel(kq))
            seg.v_store[layer].index_copy_(0, at, sel(vq))
            if seg.ks_store is not None and seg.vs_store is not None:
                seg.ks_store[layer].index_copy_(0, at, sel(ks))
                seg.vs_store[layer].index_copy_(0, at, sel(vs))

    def read(
        self, layer: int, slots: Any, *, check: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Load ``(k, v)``, each ``float32 [T, num_kv_heads, head_dim]``, from ``slots``."""
        layer = self.check_layer(layer)
        slots = self.check_slots(slots, check)
        n = slots.numel()
        shape = (n, self.num_kv_heads, self.head_dim)
        k = torch.empty(shape, dtype=torch.float32, device=self.device)
        v = torch.empty(shape, dtype=torch.float32, device=self.device)
        if n == 0:
            return k, v
        slots = slots.to(self.device)
        for seg, at, pos in self._groups(slots):
            # A host-tier segment of a CUDA pool is read where it lives.
            where = seg.k_store.device
            if at.device != where:
                at = at.to(where)
            kk = seg.k_store[layer].index_select(0, at)
            vv = seg.v_store[layer].index_select(0, at)
            if seg.ks_store is not None and seg.vs_store is not None:
                kk = dequantize_fp8(kk.view(self.dtype), seg.ks_store[layer].index_select(0, at))
                vv = dequantize_fp8(vv.view(self.dtype), seg.vs_store[layer].index_select(0, at))
            if where != k.device:
                kk, vv = kk.to(k.device), vv.to(k.device)
            if pos is None:
                k.copy_(kk)
                v.copy_(vv)
            else:
                k.index_copy_(0, pos, kk.float())
                v.index_copy_(0, pos, vv.float())
        return k, v

    # ----- tiers ------------------------------------------------------------------

    def tier_of(self, page_ids: Any) -> npt.NDArray[np.uint8]:
        """``uint8 [n]``: :data:`DEVICE` (0) or :data:`HOST` (1) for each page id
        (``[n]`` ints). One snapshot: a page's tier changes only when its
        segment is moved by :meth:`demote`/:meth:`promote` or under pressure."""
        ids = np.asarray(page_ids.cpu() if isinstance(page_ids, torch.Tensor) else page_ids)
        tiers = self._tiers  # one read
        seg = ids.astype(np.int64, copy=False) // self.pages_per_segment
        if seg.size and (seg.min() < 0 or seg.max() >= tiers.shape[0]):
            raise InvalidArgument(
                f"page ids must be in 0..{tiers.shape[0] * self.pages_per_segment:,} "
                f"(the pool's segment slots), got {int(ids.min()):,}..{int(ids.max()):,}"
            )
        return tiers[seg]

    @property
    def host_segments(self) -> list[int]:
        """Ids of the segments in the host tier, ascending."""
        return sorted(self._host_sids)

    def demote(self, segment_ids: Any = None, n: int | None = None) -> list[int]:
        """Move device segments to the host tier; returns the ids moved.

        ``segment_ids``: these (``[k]`` ints, each a live device segment);
        else the ``n`` (default 1) coldest, ranked by how many running
        requests read them, then by how recently one did. A segment holding a
        running request's last page is never chosen (it is being written);
        naming one, or a segment already on the host, is an
        :class:`InvalidArgument`. Each move is atomic: the segment's bytes are
        copied, then its table row and tier change in one step under the
        growth lock; page ids, refcounts and the tree do not change, and no
        new page is allocated in a host segment. :class:`BudgetExhausted`
        when the host budget has no room for them all (nothing moves); when
        the host refuses memory part-way (:class:`HostMemoryRefused`), the
        segments before it have moved and it and the rest have not.
        """
        with self._locked():
            if segment_ids is None:
                k = 1 if n is None else as_count(n, "n")
                sids = self._coldest(k)
                if len(sids) < k:
                    raise InvalidArgument(
                        f"asked to demote {k} segment(s) but only {len(sids)} device segment(s) "
                        f"hold pages and no running request's last page"
                    )
            else:
                sids = self._check_tier_ids(segment_ids, DEVICE, "demote")
                writing = self._writing_segments(*self._running(), self.pages_per_segment)
                busy = sorted(set(sids) & writing)
                if busy:
                    raise InvalidArgument(
                        f"segments {busy} hold a running request's last page (being written); "
                        f"they stay on the device"
                    )
            room = self._host_room()
            if len(sids) > room:
                raise BudgetExhausted(
                    f"cannot demote {len(sids)} segment(s) of {self.segment_bytes:,} B: the host "
                    f"tier holds {self.host_reserved_bytes():,} B of its "
                    f"{self.host_budget_bytes:,} B budget ({room} segment(s) of room)"
                )
            for sid in sids:
                self._move(sid, HOST)
            return sids

    def promote(self, segment_ids: Any = None) -> list[int]:
        """Move host segments back to the device; returns the ids moved.

        ``segment_ids``: these (each a live host segment), all or none:
        :class:`BudgetExhausted` when the device budget lacks room for them.
        ``None``: the host segments running requests read, most read first,
        as many as the device budget has room for (worth it once a request
        will decode more than a few steps from them: a host page costs every
        step, a move once); segments only the cache holds stay on the host.
        Call it at a step boundary, for instance after requests finish.
        """
        with self._locked():
            room = self.room_segments(len(self._host_sids))
            if segment_ids is None:
                readers = self._readers(*self._running())
                sids = sorted(
                    (s for s in self._host_sids if readers.get(s, 0) > 0),
                    key=lambda s: (-readers[s], -self._last_read.get(s, -1), s),
                )[:room]
            else:
                sids = self._check_tier_ids(segment_ids, HOST, "promote")
                if len(sids) > room:
                    raise BudgetExhausted(
                        f"cannot promote {len(sids)} segment(s) of {self.segment_bytes:,} B: the "
                        f"device budget {self.resolved_budget()} B has room for {room}"
                    )
            for sid in sids:
                self._move(sid, DEVICE)
            return sids

    def _check_tier_ids(self, segment_ids: Any, tier: int, what: str) -> list[int]:
        ids = np.asarray(
            segment_ids.cpu() if isinstance(segment_ids, torch.Tensor) else segment_ids
        ).reshape(-1)
        sids = sorted({as_count(int(x), "segment id") for x in ids})
        for sid in sids:
            seg = self._segments[sid] if sid < len(self._segments) else None
            if seg is None:
                raise InvalidArgument(
                    f"cannot {what} segment {sid}: it is not live (live: "
                    f"{self.allocator.segments()})"
                )
            if seg.tier != tier:
                raise InvalidArgument(
                    f"cannot {what} segment {sid}: it is already in the "
                    f"{_TIER_NAMES[seg.tier]} tier"
                )
        return sids

    def _host_room(self) -> int:
        """Segments the host budget still takes (spare buffers are reused, so
        only host segments count against it here)."""
        return max(0, self.host_budget_bytes // self.segment_bytes - len(self._host_sids))

    def _running(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The attached cache's running pages (``(pages, indptr)``), or none."""
        get = getattr(self._cache, "running_pages", None)
        if get is None:
            return np.zeros(0, np.int64), np.zeros(1, np.int64)
        pages, indptr = get()
        return np.asarray(pages, np.int64), np.asarray(indptr, np.int64)

    def _readers(
        self, pages: npt.NDArray[np.int64], indptr: npt.NDArray[np.int64]
    ) -> dict[int, int]:
        """Running requests reading each segment, from one :meth:`_running`
        snapshot; refreshes the recency stamps."""
        self._rounds += 1
        if pages.size == 0:
            return {}
        seg = pages // self.pages_per_segment
        # One (request, segment) pair per request reading a segment, in one
        # vectorised pass (a 10M-token request holds 625,000 pages).
        req = np.repeat(np.arange(indptr.shape[0] - 1), np.diff(indptr))
        span = int(seg.max()) + 1
        pairs = np.unique(req * span + seg)
        counts = np.bincount(pairs % span, minlength=span)
        read = np.flatnonzero(counts)
        readers = dict(zip(read.tolist(), counts[read].tolist(), strict=True))
        for sid in readers:
            self._last_read[sid] = self._rounds
        return readers

    @staticmethod
    def _writing_segments(
        pages: npt.NDArray[np.int64], indptr: npt.NDArray[np.int64], pages_per_segment: int
    ) -> set[int]:
        """Segments holding a running request's last page (being written),
        from one :meth:`_running` snapshot."""
        ends = indptr[1:][indptr[1:] > indptr[:-1]] - 1
        return set((pages[ends] // pages_per_segment).tolist())

    def _coldest(self, k: int, usage: list[tuple[int, int]] | None = None) -> list[int]:
        """Up to ``k`` device segments to demote, coldest first (``usage``:
        the allocator's ``segment_usage()`` if the caller has it). Caller
        holds the lock."""
        running = self._running()
        readers = self._readers(*running)
        writing = self._writing_segments(*running, self.pages_per_segment)
        if usage is None:
            usage = self.allocator.segment_usage()
        order = sorted(
            (s for s, u in usage if u > 0 and s not in self._host_sids and s not in writing),
            key=lambda s: (readers.get(s, 0), self._last_read.get(s, -1), s),
        )
        return order[:k]

    def _demote_for(self, segments: int, added: list[int]) -> bool:
        """Make room for ``segments`` device segments by demoting the coldest;
        returns whether any moved. Caller holds the lock (``_make_room``)."""
        if not self.host_budget_bytes:
            return False
        # Host segments emptied by eviction or finished requests hold host
        # budget for nothing (their pages are sealed): retire them first.
        usage = self.allocator.segment_usage()
        empty = [s for s, used in usage if used == 0 and s in self._host_sids]
        if empty:
            self._retire(empty)
        if self._host_room() == 0:
            return False
        # Segments this call just added are where the pages will go: not those.
        sids = [s for s in self._coldest(segments + len(added), usage) if s not in added]
        sids = sids[: min(segments, self._host_room())]
        for i, sid in enumerate(sids):
            try:
                self._move(sid, HOST)
            except HostMemoryRefused:
                # The host refused memory: what moved so far helps; else the
                # caller goes on to eviction, as without a host tier.
                self._counters["growth_failures"] += 1
                return i > 0
        return bool(sids)

    def _take_buffer(self, tier: int) -> torch.Tensor:
        """A buffer for one segment in ``tier``: a recycled host buffer, or new."""
        if tier == HOST and self._host_spares:
            return self._host_spares.pop()
        factory = self._host_factory if tier == HOST else self._factory
        try:
            with _normal_tensors():
                buf = factory(self.segment_bytes, self.device).detach()
        except (RuntimeError, MemoryError, OSError) as e:
            if tier == HOST:
                raise HostMemoryRefused(
                    f"the host tier could not get a {self.segment_bytes:,}-byte segment "
                    f"({'pinned ' if self.device.type == 'cuda' else ''}memory refused: {e}); "
                    f"it holds {self.host_reserved_bytes():,} B of its "
                    f"{self.host_budget_bytes:,} B budget; the segment stays on the device"
                ) from e
            raise DeviceOutOfMemory(
                f"the device refused a {self.segment_bytes:,}-byte segment for a promotion "
                f"({e!r}); the segment stays in the host tier"
            ) from e
        want = "cpu" if tier == HOST else self.device.type
        if buf.device.type != want:
            raise InvalidArgument(
                f"the {_TIER_NAMES[tier]} tier's tensor factory returned a tensor on "
                f"{buf.device}, expected {want}"
            )
        return buf

    def _move(self, sid: int, tier: int) -> None:
        """Copy segment ``sid`` into ``tier`` and switch to the copy; all or
        nothing. Caller holds the lock."""
        old = self._segments[sid]
        assert old is not None and old.tier != tier
        buf = self._take_buffer(tier)
        try:
            if tier == HOST:
                # Before the copy: no page of it is handed out while bytes move.
                self.allocator.seal_segment(sid)
            seg = self._make_segment(buf, tier)
            with self._moves:  # no write lands in the old buffer after the copy
                # Kernels already queued on the current stream that write the
                # old buffer run before this copy; later ones see the new row.
                buf[: self.segment_bytes].copy_(old.buffer[: self.segment_bytes])
                if buf.device.type == "cpu" and old.buffer.device.type == "cuda":
                    torch.cuda.current_stream(old.buffer.device).synchronize()
                self._install(sid, seg)
            if tier == DEVICE:
                self.allocator.unseal_segment(sid)
        except BaseException:
            if self._segments[sid] is not old:
                self._install(sid, old)
            if tier == HOST and self.allocator.is_sealed(sid):
                self.allocator.unseal_segment(sid)  # however far the seal got
            if tier == HOST:
                self._host_spares.append(buf)
            raise
        if old.tier == HOST:
            self._host_spares.append(old.buffer)
        key = "demot" if tier == HOST else "promot"
        self._counters[key + "ions"] += 1
        self._counters[key + "ed_bytes"] += self.segment_bytes

    # ----- accounting -------------------------------------------------------------

    def reserved_bytes(self) -> int:
        """Bytes of KV memory the pool holds: live segments x segment_bytes in
        both tiers, plus spare host buffers kept for the next demotion."""
        return (self.allocator.segment_count() + len(self._host_spares)) * self.segment_bytes

    def device_reserved_bytes(self) -> int:
        """Bytes the pool holds in device segments (what ``budget_bytes`` bounds)."""
        return (self.allocator.segment_count() - len(self._host_sids)) * self.segment_bytes

    def host_reserved_bytes(self) -> int:
        """Bytes the pool holds in host-tier segments, spare host buffers
        included (what ``host_budget_bytes`` bounds)."""
        return (len(self._host_sids) + len(self._host_spares)) * self.segment_bytes

    def stats(self) -> dict[str, Any]:
        """Counters for dashboards; every value is a plain int, float or None.

        ``reserved_bytes`` is what the pool holds, ``used_bytes`` what
        referenced pages occupy; after :meth:`shrink`, reserved exceeds used by
        at most the partly filled segments plus ``reserve_segments``.
        """
        # Growth and shrink hold this lock: under it the segment set is one
        # snapshot (total_pages == segments * pages_per_segment, free <= total)
        # while other threads grow or shrink the pool.
        with self._locked():
            segments = self.allocator.segment_count()
            total = self.allocator.total_pages()
            free = self.allocator.free_pages()
            usage = self.allocator.segment_usage()
            if self._host_sids:  # sealed host segments' free pages are not in free_pages()
                free = total - sum(used for _, used in usage)
            reserved = self.reserved_bytes()
            metadata = self.allocator.metadata_bytes() + self._table.numel() * 8
            counters = dict(self._counters)
            tiers = self._tier_stats(usage)
            device_reserved = self.device_reserved_bytes()
        budget = self.resolved_budget(device_reserved)
        out: dict[str, Any] = {
            "segments": segments,
            "pages_per_segment": self.pages_per_segment,
            "page_size": self.page_size,
            "segment_bytes": self.segment_bytes,
            "reserved_bytes": reserved,
            "used_bytes": (total - free) * self.page_bytes,
            "total_pages": total,
            "free_pages": free,
            "used_pages": total - free,
            "budget_bytes": budget,
            "bytes_per_token": self.bytes_per_token,
            "metadata_bytes": metadata,
            "tiers": tiers,
            **counters,
        }
        if self._cache is not None:
            out.update(self._cache.cache_stats())
        return out

    def _tier_stats(self, usage: list[tuple[int, int]]) -> dict[str, dict[str, int]]:
        """Per tier from ``usage`` (the allocator's ``segment_usage()``):
        segments, reserved and used bytes, used pages. Caller holds the lock."""
        out = {
            name: {"segments": 0, "reserved_bytes": 0, "used_bytes": 0, "used_pages": 0}
            for name in _TIER_NAMES
        }
        for sid, used in usage:
            t = out[_TIER_NAMES[HOST if sid in self._host_sids else DEVICE]]
            t["segments"] += 1
            t["reserved_bytes"] += self.segment_bytes
            t["used_pages"] += used
            t["used_bytes"] += used * self.page_bytes
        out["host"]["reserved_bytes"] += len(self._host_spares) * self.segment_bytes
        out["host"]["budget_bytes"] = self.host_budget_bytes
        return out

    def check_invariants(self) -> None:
        """Raise :class:`radixseg.InvariantViolation` on any breach (tests call it)."""
        from radixseg._core import InvariantViolation

        self.allocator.check_invariants()
        reserved = self.allocator.reserved_segments()
        if reserved:
            raise InvariantViolation(
                f"segments {reserved} are reserved in the allocator outside a growth"
            )
        live = set(self.allocator.segments())
        have = {i for i, s in enumerate(self._segments) if s is not None}
        if live != have:
            raise InvariantViolation(
                f"segments with tensors {sorted(have - live)} are not live in the allocator "
                f"/ live segments {sorted(live - have)} have no tensors"
            )
        for sid in live:
            seg = self._segments[sid]
            assert seg is not None
            if int(self._table[sid, 0]) != seg.views.k.data_ptr():
                raise InvariantViolation(f"segment_table row {sid} does not point at its k tensor")
            on_host = sid in self._host_sids
            if on_host != (seg.tier == HOST) or int(self._tiers[sid]) != seg.tier:
                raise InvariantViolation(
                    f"segment {sid} is in tier {seg.tier} but the tier map says "
                    f"{int(self._tiers[sid])} / host set {on_host}"
                )
            if on_host != self.allocator.is_sealed(sid):
                raise InvariantViolation(
                    f"segment {sid}: host tier {on_host} but sealed {not on_host} (host "
                    f"segments and only they take no new pages)"
                )
        if not self._host_sids <= live:
            raise InvariantViolation(f"host segments {sorted(self._host_sids - live)} are not live")
        if self.host_reserved_bytes() > max(self.host_budget_bytes, 0):
            raise InvariantViolation(
                f"the host tier holds {self.host_reserved_bytes():,} B past its "
                f"{self.host_budget_bytes:,} B budget"
            )

    def __repr__(self) -> str:
        return (
            f"KVPool(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, page_size={self.page_size}, dtype={self.dtype}, "
            f"device={self.device}, segments={self.allocator.segment_count()}, "
            f"segment_bytes={self.segment_bytes:,})"
        )


class _NoRoom(Exception):
    """Internal: neither growth nor eviction can make room for an allocation."""

    def __init__(self, need: int, failure: _GrowthFailed | None) -> None:
        super().__init__(f"{need} segments needed")
        self.need = need
        self.failure = failure


class _GrowthFailed(Exception):
    """Internal: the tensor factory raised while adding segments."""

    def __init__(self, made: int, cause: BaseException) -> None:
        super().__init__(f"segment {made + 1} could not be allocated: {cause!r}")
        self.cause = cause
