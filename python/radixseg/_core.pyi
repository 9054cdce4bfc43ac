"""Type stubs for the Rust extension ``radixseg._core``."""

from typing import Final

import numpy as np
import numpy.typing as npt
from typing_extensions import disjoint_base

__all__ = [
    "PAGE_ID_LIMIT",
    "BudgetExhausted",
    "DoubleFree",
    "InvalidArgument",
    "InvalidHandle",
    "InvariantViolation",
    "OutOfPages",
    "RadixsegError",
    "SegmentAllocator",
    "SegmentBusy",
    "__version__",
]

__version__: Final[str]
PAGE_ID_LIMIT: Final[int]

class RadixsegError(Exception): ...

class OutOfPages(RadixsegError):
    requested: int
    available: int
    total: int
    segments: int

class BudgetExhausted(OutOfPages): ...

class InvalidHandle(RadixsegError):
    page_id: int

class DoubleFree(InvalidHandle): ...

class SegmentBusy(RadixsegError):
    segment: int
    used_pages: int

class InvalidArgument(RadixsegError): ...
class InvariantViolation(RadixsegError): ...

_Ids = npt.NDArray[np.int64] | npt.NDArray[np.int32]

@disjoint_base
class SegmentAllocator:
    def __new__(
        cls, page_size: int, pages_per_segment: int, max_segments: int | None = None
    ) -> SegmentAllocator: ...
    @property
    def page_size(self) -> int: ...
    @property
    def pages_per_segment(self) -> int: ...
    @property
    def max_segments(self) -> int: ...
    def add_segment(self) -> int: ...
    def retire_segment(self, segment: int) -> None: ...
    def alloc(self, n: int) -> npt.NDArray[np.int32]: ...
    def retain(self, ids: _Ids) -> None: ...
    def release(self, ids: _Ids) -> None: ...
    def refcount(self, ids: _Ids) -> npt.NDArray[np.int32]: ...
    def free_pages(self) -> int: ...
    def total_pages(self) -> int: ...
    def segments(self) -> list[int]: ...
    def segment_usage(self) -> list[tuple[int, int]]: ...
    def metadata_bytes(self) -> int: ...
    def check_invariants(self) -> None: ...
