"""Argument conversion shared by every public class.

Page ids and token ids arrive as anything array-like (a torch tensor, a numpy
array, a list, a single int) and leave as torch ``int32`` CPU tensors. This
module turns inputs into 1-D numpy integer arrays the Rust core accepts, and
raises a typed error naming the offending value for anything else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from radixseg._core import InvalidArgument

__all__ = ["COUNT_LIMIT", "Uncopyable", "as_count", "as_id_array", "as_namespace", "to_tensor"]

_INT_KINDS = ("i", "u")
_NP_FAST_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))

#: The largest count any call takes: the core stores counts in 64-bit integers.
COUNT_LIMIT = 2**63 - 1


def as_count(n: Any, what: str = "n", limit: int = COUNT_LIMIT) -> int:
    """A Python int in ``0..=limit`` from an int-like, else ``TypeError``/``InvalidArgument``.

    Accepts ``int``, numpy integers and one-element integer tensors; refuses
    ``bool`` (also as a tensor), floats, strings and anything else by name.
    """
    if type(n) is int and 0 <= n <= limit:
        return n
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        if (
            isinstance(n, torch.Tensor)
            and n.numel() == 1
            and not (n.is_floating_point() or n.is_complex() or n.dtype == torch.bool)
        ):
            n = n.item()
        else:
            raise TypeError(f"{what} must be an int, got {type(n).__name__}: {_short(n)}")
    count = int(n)
    if count < 0:
        raise InvalidArgument(f"{what} must be non-negative, got {count}")
    if count > limit:
        raise InvalidArgument(f"{what}={count} is past the limit of {limit:,}")
    return count


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


class Uncopyable:
    """Refuses ``copy``, ``deepcopy`` and ``pickle`` with one clear message.

    Pools, caches, trees, allocators and requests own pages through refcounts
    and (for pools) device memory: a copy would share the segments while
    believing it owns them, and the first growth or end of either copy would
    corrupt the other. Share the object itself instead.
    """

    __slots__ = ()

    def _refuse(self, how: str) -> Any:
        name = type(self).__name__
        raise TypeError(
            f"a {name} cannot be {how}: it owns KV pages by reference count (and a pool its "
            f"device memory), so a copy would free or reuse what the original still holds; "
            f"share the {name} itself"
        )

    def __copy__(self) -> Any:
        return self._refuse("copied")

    def __deepcopy__(self, memo: Any) -> Any:
        return self._refuse("copied")

    def __reduce_ex__(self, protocol: Any) -> Any:
        return self._refuse("pickled")


def as_namespace(namespace: Any) -> int:
    """A namespace key: an int in ``0..2**64``, else ``TypeError``/``InvalidArgument``."""
    if type(namespace) is int and 0 <= namespace < 2**64:
        return namespace
    if isinstance(namespace, bool) or not isinstance(namespace, (int, np.integer)):
        raise TypeError(f"namespace must be an int, got {type(namespace).__name__}: {namespace!r}")
    ns = int(namespace)
    if not 0 <= ns < 2**64:
        raise InvalidArgument(f"namespace must be in 0..2^64 - 1, got {ns}")
    return ns


def as_id_array(ids: Any, what: str = "page ids") -> npt.NDArray[np.int32] | npt.NDArray[np.int64]:
    """A contiguous 1-D ``int32``/``int64`` numpy array from an array-like of ints.

    Accepts torch tensors (CPU only, integer dtype), numpy arrays, sequences of
    ints and a single int. Range checks happen in the Rust core, which reports
    the first bad value.
    """
    # The common cases first, with as few attribute lookups as possible (this
    # runs on every call of the per-request API): a 1-D contiguous int32/int64
    # numpy array, or a CPU tensor that views as one (ids from alloc or a match).
    kind = type(ids)
    arr: npt.NDArray[Any] | None
    if kind is np.ndarray:
        arr = ids
    elif kind is torch.Tensor:
        try:
            arr = ids.numpy()
        except (RuntimeError, TypeError):  # CUDA, autograd, conjugate bits: below
            arr = None
    else:
        arr = None
    if (
        arr is not None
        and arr.dtype in _NP_FAST_DTYPES
        and arr.ndim == 1
        and arr.flags.c_contiguous
    ):
        return arr  # int32 or int64, checked above
    if isinstance(ids, torch.Tensor):
        if ids.device.type != "cpu":
            raise InvalidArgument(
                f"{what} must be a CPU tensor, got one on device {ids.device}; "
                "call .cpu() first (page tables are built on the host)"
            )
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{what} must have an integer dtype, got {ids.dtype}")
        if ids.dim() > 1:
            raise InvalidArgument(
                f"{what} must be 1-D, got a tensor of shape {tuple(ids.shape)} (a batch "
                f"is not flattened into one sequence: pass one row at a time)"
            )
        t = ids.detach().reshape(-1)
        if t.dtype not in (torch.int32, torch.int64):
            t = t.to(torch.int64)
        return np.ascontiguousarray(t.numpy())
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        return np.array([int(ids)], dtype=np.int64)
    try:
        arr = np.asarray(ids)
    except (OverflowError, ValueError) as e:
        raise InvalidArgument(f"{what} must be integers below 2^63: {e}") from None
    if arr.ndim > 1:
        raise InvalidArgument(
            f"{what} must be 1-D, got shape {arr.shape} (a batch is not flattened into "
            f"one sequence: pass one row at a time)"
        )
    if arr.dtype == object:
        for i, x in enumerate(arr.reshape(-1)):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                # Decimal, Fraction, float... would be truncated silently by the cast.
                raise TypeError(
                    f"{what} must be integers, got {type(x).__name__} {_short(x)} at index {i}"
                )
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError as e:
            raise InvalidArgument(f"{what} must be integers below 2^63: {e}") from None
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} must be integers: {e}") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in _INT_KINDS:
        raise TypeError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.max() > np.iinfo(np.int64).max:
        raise InvalidArgument(f"{what}: value {int(arr.max())} is past int64")
    arr = arr.reshape(-1)
    if arr.dtype not in (np.int32, np.int64):
        arr = arr.astype(np.int64)
    return np.ascontiguousarray(arr)


def to_tensor(arr: npt.NDArray[Any]) -> torch.Tensor:
    """Wrap a numpy array from the core as a torch tensor without copying."""
    return torch.from_numpy(arr)
