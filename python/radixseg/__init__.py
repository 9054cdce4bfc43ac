"""radixseg: a KV-cache memory manager that grows by segments.

KV memory is a list of fixed-size segments added as demand grows and released
when empty; pages are named by stable page ids that never move while
referenced. The Rust core (``radixseg._core``) decides which pages exist and
who references them; Python owns the bytes.
"""

import sys as _sys

from radixseg import attention
from radixseg._core import (
    BudgetExhausted,
    DeviceOutOfMemory,
    DoubleFree,
    InvalidArgument,
    InvalidHandle,
    InvariantViolation,
    OutOfPages,
    RadixsegError,
    SegmentBusy,
    __version__,
)
from radixseg.allocator import SegmentAllocator
from radixseg.cache import PrefixCache, Request
from radixseg.capacity import Plan, plan
from radixseg.pool import KVPool, SegmentTensors
from radixseg.tree import MatchResult, RadixTree

# ``radixseg.plan`` is the planner function. The module that shared its name is
# ``radixseg.capacity`` (issue 17); this alias keeps ``from radixseg.plan import
# parse_bytes`` (and Plan pickles naming the old module) working for code
# written against it. New code imports from ``radixseg.capacity``.
_sys.modules.setdefault("radixseg.plan", _sys.modules["radixseg.capacity"])

__all__ = [
    "BudgetExhausted",
    "DeviceOutOfMemory",
    "DoubleFree",
    "InvalidArgument",
    "InvalidHandle",
    "InvariantViolation",
    "KVPool",
    "MatchResult",
    "OutOfPages",
    "Plan",
    "PrefixCache",
    "RadixTree",
    "RadixsegError",
    "Request",
    "SegmentAllocator",
    "SegmentBusy",
    "SegmentTensors",
    "__version__",
    "attention",
    "plan",
]
