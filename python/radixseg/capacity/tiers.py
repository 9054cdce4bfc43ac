"""A context split between device memory and a host-memory tier, and the
step-time model of decoding it (``radixseg plan --host-memory``).

A :class:`radixseg.KVPool` with ``host_budget_bytes`` keeps the segments that
do not fit its device budget in host memory. :func:`plan_tiers` splits one
context's KV (and FP8 scales) per device the same way: the device holds what
fits in its usable bytes (the plan's reserve logic: memory fraction, weights),
the host the rest. It then estimates one decode step's time from bandwidths
(the step-time model of the host-tier design note, section 2), two ways:

* **in place** (radixseg): the device part is read at HBM bandwidth, the host
  part by the native CPU kernel at ``0.55 x`` the host's DRAM bandwidth (what
  a CPU decode kernel reaches of a memcpy), in parallel; only the query and
  the partial results cross PCIe.
* **copy-back** (SGLang HiCache, vLLM's offloading connector, LMCache): the
  host part is copied over PCIe into device memory every step (streamed per
  layer, overlapped with compute), then the device reads all of the KV.

These are *model estimates* from the stated bandwidths, not measurements:
they leave out the non-attention work of a step, launch and synchronisation
costs (~10-20 us per layer), and host bandwidth shared by other GPUs.

Example: 10M tokens of a Qwen3-8B-shaped model at TP 4 in FP8 (18,432 B/token
of KV + 576 B of scales per device), 121 GB of device memory left for KV and
80 GB of host memory per device:

>>> from radixseg.capacity import plan
>>> p = plan(num_layers=36, num_kv_heads=8, head_dim=128, kv_dtype="fp8", tp=4,
...          device_bytes="121GB", host_bytes="80GB", context=10_000_000)
>>> t = p.tiers
>>> round(t.device_bytes / 1e9, 1), round(t.host_bytes / 1e9, 1), round(t.host_fraction, 2)
(121.0, 69.1, 0.36)
>>> round(t.device_seconds * 1e3), round(t.host_in_place_seconds, 2)
(25, 0.63)
>>> round(t.host_copy_back_seconds, 2)
1.26
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from radixseg._core import InvalidArgument

if TYPE_CHECKING:
    from radixseg.capacity.report import Plan

__all__ = [
    "DEFAULT_HBM_GBPS",
    "DEFAULT_HOST_GBPS",
    "DEFAULT_PCIE_GBPS",
    "IN_PLACE_EFFICIENCY",
    "ContextDoesNotFit",
    "TierPlan",
    "plan_tiers",
]

#: HBM bandwidth of one device, GB/s (H200: 4.8 TB/s).
DEFAULT_HBM_GBPS = 4800.0
#: DRAM bandwidth of the host, GB/s (a two-socket server: 200-500 GB/s).
DEFAULT_HOST_GBPS = 200.0
#: PCIe bandwidth per direction, GB/s (Gen5 x16: 51-55 GB/s measured).
DEFAULT_PCIE_GBPS = 55.0
#: Share of the host's DRAM bandwidth a CPU decode kernel reaches (<= 0.55 of memcpy).
IN_PLACE_EFFICIENCY = 0.55


class ContextDoesNotFit(InvalidArgument):
    """A context's KV does not fit in device memory plus the host tier.

    Attributes: ``need_bytes`` (KV and scales per device), ``device_bytes``
    (usable device bytes for KV), ``host_bytes`` (the host tier's bytes) and
    ``short_bytes`` (what is missing).
    """

    need_bytes: int
    device_bytes: int
    host_bytes: int
    short_bytes: int


@dataclass(frozen=True)
class TierPlan:
    """One context's KV per device split between device memory and the host
    tier, and the model's decode step time (every size in bytes, every time
    in seconds; see the module docstring).

    Attributes
    ----------
    total_bytes : int
        KV and FP8 scales of the context on one device (one rank with
        context parallelism), whole pages.
    device_budget_bytes : int
        What the device holds for KV after the plan's reserve logic
        (``Plan.usable_bytes_per_device``, 0 when the weights fill it).
    host_budget_bytes : int
        The host tier's bytes for this device (``--host-memory``).
    device_bytes, host_bytes : int
        The split: ``min(total, device budget)`` on the device, the rest on the
        host (bytes; a pool moves whole segments, so each side may take up to
        one segment more).
    host_fraction : float
        ``host_bytes / total_bytes``.
    hbm_gbps, host_gbps, pcie_gbps : float
        The bandwidths the estimate uses, GB/s (10^9 B/s).
    device_seconds : float
        ``device_bytes / HBM``: the device part of one step.
    host_in_place_seconds : float
        ``host_bytes / (0.55 x host DRAM)``: the CPU kernel over the host part.
    host_copy_back_seconds : float
        ``host_bytes / PCIe``: copying the host part to the device.
    step_in_place_seconds : float
        ``max(device part, host part in place)``: both run at once.
    step_copy_back_seconds : float
        ``max(all KV / HBM, host part / PCIe)``: the copy streamed per layer
        under the device's read of every byte.
    pcie_bytes_copy_back : int
        Bytes crossing PCIe per copy-back step: ``host_bytes``. In place, only
        the query and the partial results cross (kilobytes per layer).
    """

    context: int
    total_bytes: int
    device_budget_bytes: int
    host_budget_bytes: int
    device_bytes: int
    host_bytes: int
    host_fraction: float
    hbm_gbps: float
    host_gbps: float
    pcie_gbps: float
    in_place_efficiency: float
    device_seconds: float
    host_in_place_seconds: float
    host_copy_back_seconds: float
    step_in_place_seconds: float
    step_copy_back_seconds: float
    pcie_bytes_copy_back: int

    @property
    def in_place_gbps(self) -> float:
        """The CPU kernel's modelled rate over the host part, GB/s."""
        return self.in_place_efficiency * self.host_gbps

    def rows(self) -> list[tuple[str, str]]:
        """Rows of the ``radixseg plan`` table."""
        from radixseg.capacity.report import _gb

        rows = [
            (
                "host tier",
                f"{_gb(self.host_budget_bytes)} of host memory per device; KV + scales "
                f"{_gb(self.total_bytes)} per device fit: {_gb(self.device_bytes)} on the device "
                f"(of {_gb(self.device_budget_bytes)} usable), {_gb(self.host_bytes)} on the "
                f"host ({self.host_fraction:.1%})",
            )
        ]
        if not self.host_bytes:
            rows.append(("", "the context fits in device memory: nothing on the host"))
        rows += [
            (
                "step (model)",
                f"device part {_ms(self.device_seconds)} at {self.hbm_gbps:,.0f} GB/s HBM; "
                f"host part in place {_ms(self.host_in_place_seconds)} at "
                f"{self.in_place_efficiency:.2f} x {self.host_gbps:,.0f} GB/s host DRAM, "
                f"copy-back {_ms(self.host_copy_back_seconds)} at {self.pcie_gbps:,.0f} GB/s PCIe",
            ),
            (
                "",
                f"decode step, attention only: in place ~{_ms(self.step_in_place_seconds)} "
                f"(max of the two parts; only q and the partials cross PCIe), copy-back "
                f"~{_ms(self.step_copy_back_seconds)} ({_gb(self.pcie_bytes_copy_back)} "
                f"over PCIe per step)",
            ),
            (
                "",
                "model estimates from these bandwidths, not measurements: no non-attention "
                "work, launch or sync costs, or host bandwidth shared by other devices",
            ),
        ]
        return rows


def _ms(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:,.2f} s"
    return f"{seconds * 1e3:,.1f} ms"


def _rate(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not v > 0:
        raise InvalidArgument(f"{name}={v!r} must be a positive number of GB/s")
    return float(v)


def plan_tiers(
    p: Plan,
    host_bytes: int,
    *,
    hbm_gbps: float = DEFAULT_HBM_GBPS,
    host_gbps: float = DEFAULT_HOST_GBPS,
    pcie_gbps: float = DEFAULT_PCIE_GBPS,
) -> TierPlan:
    """Split ``p``'s context between device memory and ``host_bytes`` of host
    tier per device, with the model's step times.

    Raises
    ------
    radixseg.InvalidArgument
        When ``p`` has no device memory (``device_bytes``) or a bandwidth is
        not a positive number.
    ContextDoesNotFit
        (an :class:`InvalidArgument`) when the context's KV and scales are past
        the device's usable bytes plus ``host_bytes``; the message gives the numbers.
    """
    from radixseg.capacity.report import _gb

    hbm, host_bw, pcie = (
        _rate("hbm_gbps", hbm_gbps),
        _rate("host_gbps", host_gbps),
        _rate("pcie_gbps", pcie_gbps),
    )
    if isinstance(host_bytes, bool) or not isinstance(host_bytes, int) or host_bytes < 0:
        raise InvalidArgument(f"host_bytes={host_bytes!r} must be a whole number of bytes >= 0")
    if p.usable_bytes_per_device is None:
        raise InvalidArgument(
            "a host tier needs the device's memory: give device_bytes (--device-memory)"
        )
    total = p.context_kv_bytes_per_rank + p.context_scale_bytes_per_rank
    budget = max(0, p.usable_bytes_per_device)
    on_device = min(total, budget)
    on_host = total - on_device
    if on_host > host_bytes:
        err = ContextDoesNotFit(
            f"{p.context:,} tokens need {_gb(total)} of KV + scales per device, past the "
            f"{_gb(budget)} the device holds for KV plus the {_gb(host_bytes)} of the host "
            f"tier: {_gb(on_host - host_bytes)} short; raise --host-memory to at least "
            f"{on_host:,} B, or add devices (--tp, --cp)"
        )
        err.need_bytes = total
        err.device_bytes = budget
        err.host_bytes = host_bytes
        err.short_bytes = on_host - host_bytes
        raise err
    device_s = on_device / (hbm * 1e9)
    in_place_s = on_host / (IN_PLACE_EFFICIENCY * host_bw * 1e9)
    copy_s = on_host / (pcie * 1e9)
    return TierPlan(
        context=p.context,
        total_bytes=total,
        device_budget_bytes=budget,
        host_budget_bytes=host_bytes,
        device_bytes=on_device,
        host_bytes=on_host,
        host_fraction=on_host / total if total else 0.0,
        hbm_gbps=hbm,
        host_gbps=host_bw,
        pcie_gbps=pcie,
        in_place_efficiency=IN_PLACE_EFFICIENCY,
        device_seconds=device_s,
        host_in_place_seconds=in_place_s,
        host_copy_back_seconds=copy_s,
        step_in_place_seconds=max(device_s, in_place_s),
        step_copy_back_seconds=max(total / (hbm * 1e9), copy_s),
        pcie_bytes_copy_back=on_host,
    )
