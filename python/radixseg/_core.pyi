"""Type stubs for the Rust extension ``radixseg._core``."""

from typing import Final, Literal, final, overload

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, disjoint_base

__all__ = [
    "PAGE_ID_LIMIT",
    "TOKEN_LIMIT",
    "BudgetExhausted",
    "DeviceOutOfMemory",
    "DoubleFree",
    "InvalidArgument",
    "InvalidHandle",
    "InvariantViolation",
    "OutOfPages",
    "RadixTree",
    "RadixsegError",
    "RequestRecord",
    "SegmentAllocator",
    "SegmentBusy",
    "__version__",
    "cpu_isas",
    "decode_cpu",
    "extend_cpu",
]

__version__: Final[str]
PAGE_ID_LIMIT: Final[int]
TOKEN_LIMIT: Final[int]

# Every attribute the binding (rust/radixseg-py/src/errors.rs, one match over
# CoreError) or KVPool sets on an exception, with the errors that set it; an
# instance carries only its own error's attributes, and its message carries
# the same numbers. tests/test_error_attributes.py checks that each
# attribute raised is declared here.

class RadixsegError(Exception):
    page_id: int  # a refcount that would pass 2^32 - 1

class OutOfPages(RadixsegError):
    requested: int  # too few free pages
    available: int
    total: int  # too few free pages in the allocator
    segments: int  # too few free pages, or the 31-bit id space is full
    limit: int  # the id space is full: the most segments it allows
    reserved_bytes: int  # KVPool's BudgetExhausted and DeviceOutOfMemory,
    budget_bytes: int | None  # with requested and available

class BudgetExhausted(OutOfPages): ...
class DeviceOutOfMemory(OutOfPages): ...

class InvalidHandle(RadixsegError):
    page_id: int  # a page id that names no referenced page
    segment: int  # ... because its segment is not live
    node: int  # a node handle that names no live node

class DoubleFree(InvalidHandle): ...

class SegmentBusy(RadixsegError):
    segment: int
    used_pages: int

class InvalidArgument(RadixsegError):
    segment: int  # a segment id that is not live (or, opened/cancelled, not reserved)
    index: int  # a token id outside 0..2^31: its position
    value: int  # ... and its value
    node: int  # an unlock of a node whose lock count is 0

class InvariantViolation(RadixsegError): ...

_Ids = npt.NDArray[np.int64] | npt.NDArray[np.int32]

@disjoint_base
class SegmentAllocator:
    def __new__(
        cls, page_size: int, pages_per_segment: int, max_segments: int | None = None
    ) -> Self: ...
    @property
    def page_size(self) -> int: ...
    @property
    def pages_per_segment(self) -> int: ...
    @property
    def max_segments(self) -> int: ...
    def add_segment(self) -> int: ...
    def reserve_segment(self) -> int: ...
    def open_segment(self, segment: int) -> None: ...
    def cancel_segment(self, segment: int) -> None: ...
    def reserved_segments(self) -> list[int]: ...
    def is_live(self, segment: int) -> bool: ...
    def retire_segment(self, segment: int) -> None: ...
    def alloc(self, n: int) -> npt.NDArray[np.int32]: ...
    def retain(self, ids: _Ids) -> None: ...
    def release(self, ids: _Ids) -> None: ...
    def refcount(self, ids: _Ids) -> npt.NDArray[np.int32]: ...
    def free_pages(self) -> int: ...
    def total_pages(self) -> int: ...
    def segment_count(self) -> int: ...
    def segments(self) -> list[int]: ...
    def segment_usage(self) -> list[tuple[int, int]]: ...
    def metadata_bytes(self) -> int: ...
    def check_invariants(self) -> None: ...

@disjoint_base
class RadixTree:
    def __new__(cls, allocator: SegmentAllocator) -> Self: ...
    @property
    def allocator(self) -> SegmentAllocator: ...
    @property
    def page_size(self) -> int: ...
    def match_prefix(
        self, tokens: _Ids, namespace: int = 0
    ) -> tuple[npt.NDArray[np.int32], int, int]: ...
    def insert(self, tokens: _Ids, page_ids: _Ids, namespace: int = 0) -> int: ...
    def acquire(
        self, tokens: _Ids, namespace: int = 0
    ) -> tuple[npt.NDArray[np.int32], int, int]: ...
    def begin_request(
        self, tokens: _Ids, namespace: int = 0, leave_last: bool = False
    ) -> RequestRecord: ...
    @overload
    def extend_each(
        self,
        requests: list[RequestRecord],
        tokens: _Ids,
        short_ok: Literal[False] = False,
        evict_at: int = -1,
    ) -> npt.NDArray[np.int64]: ...
    @overload
    def extend_each(
        self, requests: list[RequestRecord], tokens: _Ids, short_ok: bool, evict_at: int = -1
    ) -> npt.NDArray[np.int64] | int: ...
    def evicted_pages(self) -> int: ...
    def page_table(
        self, requests: list[RequestRecord], out: npt.NDArray[np.int32] | None = None
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]: ...
    def running_requests(self) -> int: ...
    def request_counters(self) -> tuple[int, int, int]: ...
    def check_requests(self, exclusive: bool = False) -> None: ...
    def finish(
        self,
        tokens: _Ids,
        page_ids: _Ids,
        namespace: int = 0,
        node: int | None = None,
        cache: bool = True,
        owned_from: int = 0,
    ) -> int: ...
    def lock(self, node: int) -> None: ...
    def unlock(self, node: int) -> None: ...
    def evict(self, n_pages: int) -> int: ...
    def reset(self) -> None: ...
    def lock_count(self, node: int) -> int: ...
    def evictable_pages(self) -> int: ...
    def locked_pages(self) -> int: ...
    def cached_pages(self) -> int: ...
    def cached_tokens(self) -> int: ...
    def node_count(self) -> int: ...
    def metadata_bytes(self) -> int: ...
    def cached_sequences(
        self,
    ) -> list[tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int32]]]: ...
    def check_invariants(self) -> None: ...

@final
class RequestRecord:
    @overload
    def extend(
        self, tokens: _Ids, short_ok: Literal[False] = False, evict_at: int = -1
    ) -> npt.NDArray[np.int64]: ...
    @overload
    def extend(
        self, tokens: _Ids, short_ok: bool, evict_at: int = -1
    ) -> npt.NDArray[np.int64] | int: ...
    def end(self, cache: bool, tokens: _Ids | None = None) -> int: ...
    def truncate(self, seq_len: int) -> None: ...
    def tokens(self) -> npt.NDArray[np.int32]: ...
    def new_tokens(self) -> npt.NDArray[np.int32]: ...
    def page_ids(self) -> npt.NDArray[np.int32]: ...
    @property
    def seq_len(self) -> int: ...
    @property
    def num_pages(self) -> int: ...
    @property
    def matched_pages(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def namespace(self) -> int: ...
    @property
    def matched_len(self) -> int: ...
    @property
    def node(self) -> int | None: ...

def decode_cpu(
    buffers: list[npt.NDArray[np.uint8] | None],
    offsets: tuple[int, int, int, int],
    page_size: int,
    pages_per_segment: int,
    kv_heads: int,
    head_dim: int,
    format: str,
    q: npt.NDArray[np.float32],
    q_heads: int,
    kv_indptr: npt.NDArray[np.int64],
    kv_indices: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    sm_scale: float,
    threads: int = 1,
    isa: str = "auto",
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], str]: ...
def extend_cpu(
    buffers: list[npt.NDArray[np.uint8] | None],
    offsets: tuple[int, int, int, int],
    page_size: int,
    pages_per_segment: int,
    kv_heads: int,
    head_dim: int,
    format: str,
    q: npt.NDArray[np.float32],
    q_heads: int,
    qo_indptr: npt.NDArray[np.int64],
    kv_indptr: npt.NDArray[np.int64],
    kv_indices: npt.NDArray[np.int64],
    kv_lens: npt.NDArray[np.int64],
    sm_scale: float,
    causal: bool = True,
    threads: int = 1,
    isa: str = "auto",
    window_left: int = -1,
    chunk_size: int = 0,
    soft_cap: float = 0.0,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], str]: ...
def cpu_isas() -> list[str]: ...
def _after_fork_in_child() -> None: ...
