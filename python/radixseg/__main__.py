"""The ``radixseg`` command line.

``radixseg demo`` serves multi-turn chats over shared system prompts, grows one
context to 10M tokens in a pool that starts empty, shares it with follow-up
requests through the radix tree, and hands every byte back (see
:mod:`radixseg.demo`). ``radixseg plan`` sizes the KV cache of a model from its
``config.json``: bytes per token, per context, and what fits, on one device or
over ``--cp`` context-parallel ranks; with ``--host-memory``, how a context
splits between device memory and a host tier, and a model of its decode step.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from radixseg import InvalidArgument, RadixsegError
from radixseg._spawn import RankFailed
from radixseg.capacity import parse_bytes, parse_count
from radixseg.capacity import plan as make_plan
from radixseg.demo import run_demo

__all__ = ["main"]


# `--quick`: the same phases at a size a test or a first look affords (seconds).
QUICK = {
    "tokens": "100k",
    "chunk": 8_192,
    "segment_bytes": "1MiB",
    "chats": 8,
    "turns": 3,
    "system_len": 256,
}


def _demo(args: argparse.Namespace) -> int:
    # Sizes not given fall back to --quick's, then to run_demo's own defaults.
    sizes: dict[str, Any] = dict(QUICK) if args.quick else {}
    sizes.update({k: getattr(args, k) for k in QUICK if getattr(args, k) is not None})
    try:
        if "tokens" in sizes:
            sizes["tokens"] = parse_count(sizes["tokens"], "--tokens")
        if "segment_bytes" in sizes:
            sizes["segment_bytes"] = parse_bytes(sizes["segment_bytes"], "--segment-bytes")
        run_demo(
            **sizes,
            followups=args.followups,
            page_size=args.page_size,
            seed=args.seed,
            progress=args.progress,
            device=args.device,
            dtype=args.dtype,
            budget_bytes=None if args.budget is None else parse_bytes(args.budget, "--budget"),
            host_budget_bytes=0
            if args.host_budget is None
            else parse_bytes(args.host_budget, "--host-budget"),
            plot=args.plot or None,
            ranks=args.ranks,
            model=args.model,
        )
    except RadixsegError as e:  # bad sizes, or a budget too small for the demo
        print(f"radixseg demo: error: {e}", file=sys.stderr)
        return 2
    except RankFailed as e:  # --ranks: a rank raised or died; every process is joined
        print(f"radixseg demo: error: {e}", file=sys.stderr)
        return 1
    return 0


def _plan(args: argparse.Namespace) -> int:
    try:
        if args.config is None and args.layers is None:
            raise InvalidArgument(
                "give --config PATH (an HF config.json) or --layers with "
                "--kv-heads and --head-dim (or --kv-lora-rank and --rope-dim for MLA)"
            )
        p = make_plan(
            args.config,
            kv_dtype=args.kv_dtype,
            device_bytes=None
            if args.device_memory is None
            else parse_bytes(args.device_memory, "--device-memory"),
            weights_bytes=parse_bytes(args.weights, "--weights"),
            tp=args.tp,
            cp=args.cp,
            context=parse_count(args.context, "--context"),
            page_size=args.page_size,
            segment_bytes=parse_bytes(args.segment_bytes, "--segment-bytes"),
            memory_fraction=args.memory_fraction,
            num_layers=args.layers,
            num_kv_heads=args.kv_heads,
            head_dim=args.head_dim,
            kv_lora_rank=args.kv_lora_rank,
            qk_rope_head_dim=args.rope_dim,
            host_bytes=None
            if args.host_memory is None
            else parse_bytes(args.host_memory, "--host-memory"),
            hbm_gbps=args.hbm_gbps,
            host_gbps=args.host_gbps,
            pcie_gbps=args.pcie_gbps,
        )
    except InvalidArgument as e:
        print(f"radixseg plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.as_dict(), indent=2) if args.json else p.table())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``radixseg`` command."""
    p = argparse.ArgumentParser(prog="radixseg", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser(
        "demo",
        help="serve chats, grow one context to 10M tokens, share it, hand the memory back",
        description="Multi-turn chats over shared system prompts, then one context grows to "
        "--tokens in a pool that starts empty, is shared by follow-up requests through the "
        "radix tree, and is handed back by shrink(). Prints a table of memory by phase and "
        "writes a PNG of memory over time.",
    )
    d.add_argument(
        "--quick",
        action="store_true",
        help="a small run (100k tokens, 1 MiB segments, 8 chats x 3 turns) in seconds",
    )
    d.add_argument("--tokens", help="context length, e.g. 10M (default) or 1M")
    d.add_argument("--chunk", type=int, help="tokens added per step (default 262144)")
    d.add_argument("--followups", type=int, default=3, help="requests sharing the context")
    d.add_argument("--chats", type=int, help="conversations in the chat trace (default 64)")
    d.add_argument("--turns", type=int, help="turns per conversation (default 6)")
    d.add_argument(
        "--system-len", type=int, help="tokens of each of the 4 system prompts (default 2048)"
    )
    d.add_argument("--page-size", type=int, default=16)
    d.add_argument("--segment-bytes", help="bytes of one segment (default 64MiB)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu", help="where the KV segments live (cpu, cuda)")
    d.add_argument(
        "--dtype", default="fp8_e4m3", help="KV storage: fp8_e4m3, fp8_e5m2, bf16, fp16, fp32"
    )
    d.add_argument("--budget", help="most bytes the pool may hold, e.g. 2GB (default: none)")
    d.add_argument(
        "--host-budget",
        help="host-memory tier for segments the device budget cannot hold, e.g. 3GB: cold "
        "segments move there instead of being evicted, and decode reads them in place "
        "(default: none)",
    )
    d.add_argument(
        "--ranks",
        type=int,
        default=1,
        help="run the long context sharded over this many spawned CPU processes (gloo, "
        "context parallelism), each holding 1/ranks of it; 1 to 3 (default 1: one process)",
    )
    d.add_argument(
        "--model",
        choices=("tiny", "scout-tiny"),
        default="tiny",
        help="tiny: 1 layer (default); scout-tiny: Llama 4 Scout's layer pattern (1 full per "
        "3 chunked-8,192 layers) in a GroupedKVPool, per-group memory beside an all-layers "
        "pool's (no chat trace)",
    )
    d.add_argument(
        "--plot",
        default="radixseg-demo.png",
        help="PNG of memory over time (default radixseg-demo.png; '' to skip; needs matplotlib)",
    )
    d.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: only on a terminal; needs tqdm)",
    )
    q = sub.add_parser(
        "plan",
        help="KV bytes per token and per context, the largest context that fits, devices needed",
        description="Size a model's KV cache from its config.json or named fields. "
        "Sizes take B, KB/MB/GB/TB (10^3 steps) or KiB/MiB/GiB/TiB (2^10 steps).",
    )
    q.add_argument("--config", help="an HF config.json, or the directory holding it")
    q.add_argument("--layers", type=int, help="decoder layers (instead of --config)")
    q.add_argument("--kv-heads", type=int, help="KV heads per layer (GQA)")
    q.add_argument("--head-dim", type=int, help="elements per KV head")
    q.add_argument("--kv-lora-rank", type=int, help="MLA: latent rank (DeepSeek-V2/V3)")
    q.add_argument("--rope-dim", type=int, help="MLA: qk_rope_head_dim")
    q.add_argument(
        "--kv-dtype", default="fp8_e4m3", help="fp8_e4m3 (fp8), fp8_e5m2, bf16, fp16 or fp32"
    )
    q.add_argument("--context", default="10000000", help="tokens, e.g. 10000000 or 10M")
    q.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    q.add_argument(
        "--cp",
        type=int,
        default=1,
        help="context-parallel ranks per TP rank, each holding 1/cp of the sequence's KV "
        "(default 1; page_size x cp <= 1024); the ranks a context needs are always reported",
    )
    q.add_argument("--device-memory", help="memory of one device, e.g. 80GB, 80GiB or bytes")
    q.add_argument("--weights", default="0", help="bytes of model weights, e.g. 140GB")
    q.add_argument(
        "--memory-fraction",
        type=float,
        default=1.0,
        help="share of device memory for weights and KV (default 1.0: all of it)",
    )
    q.add_argument("--page-size", type=int, default=16, help="tokens per page")
    q.add_argument("--segment-bytes", default="64MiB", help="bytes of one segment per device")
    q.add_argument(
        "--host-memory",
        help="host memory for one device's host tier, e.g. 256GB: split the context between "
        "device and host and estimate a decode step in place vs copy-back (a model)",
    )
    q.add_argument(
        "--hbm-gbps", type=float, default=4800.0, help="device memory GB/s (default 4800)"
    )
    q.add_argument(
        "--host-gbps",
        type=float,
        default=200.0,
        help="host DRAM GB/s (default 200); the CPU kernel is modelled at 0.55 of it",
    )
    q.add_argument("--pcie-gbps", type=float, default=55.0, help="PCIe GB/s (default 55)")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        return _demo(args)
    if args.cmd == "plan":
        return _plan(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
