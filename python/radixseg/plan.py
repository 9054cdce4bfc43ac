"""Capacity planning: how many bytes of KV a model needs per token and per context.

This module does the arithmetic behind ``radixseg plan``. It reads a Hugging
Face ``config.json`` (or fields named directly) into a :class:`KVGeometry` —
layers, KV heads, head dimension, multi-head latent attention (MLA), and which
layers attend only to a window of recent tokens — and turns it, with a KV dtype,
a tensor-parallel (TP) degree and a device size, into a :class:`Plan`: KV bytes
per token for the whole model and per device, the extra bytes radixseg spends
on FP8 scales (always reported apart from the KV), tokens per segment, bytes for
a given context, the largest context that fits on one device and how many
devices a context needs. All sizes are in bytes; reports print GB (10^9 B) next
to GiB (2^30 B). Nothing here touches a device.

Example: Llama-3.1-70B in FP8 holds 80 layers x 8 KV heads x 128 dims x (K, V)
x 1 B = 163,840 B per token; at TP 8 each device holds one KV head, so a
10,000,000-token context needs 204.8 GB of KV per device, plus 6.4 GB of
radixseg's float32 scales.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import torch

from radixseg._core import InvalidArgument

__all__ = ["KVGeometry", "Plan", "kv_geometry", "parse_bytes", "parse_count", "plan"]

#: Bytes of one float32 scale. radixseg stores one per (token, KV head) for K
#: and for V when the KV dtype is FP8 (one per token per layer for MLA).
SCALE_BYTES = 4

# Sub-dictionaries that hold the language model in multimodal configs
# (Llama-4, Gemma-3, Qwen-VL: text_config; InternVL: llm_config;
# DeepSeek-VL2: language_config).
_NESTED = ("text_config", "llm_config", "language_config")
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HEADS = ("num_attention_heads", "n_head")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_FULL_TYPES = frozenset({"full_attention", "attention", "global_attention", "global"})
_SLIDING_TYPES = frozenset({"sliding_attention", "local_attention", "local", "sliding"})
_CHUNKED_TYPES = frozenset({"chunked_attention"})

# name -> (canonical name, bytes per element, stores FP8 scales)
_DTYPES: dict[str, tuple[str, int, bool]] = {
    "fp8_e4m3": ("fp8_e4m3", 1, True),
    "fp8": ("fp8_e4m3", 1, True),
    "e4m3": ("fp8_e4m3", 1, True),
    "float8_e4m3fn": ("fp8_e4m3", 1, True),
    "fp8_e5m2": ("fp8_e5m2", 1, True),
    "e5m2": ("fp8_e5m2", 1, True),
    "float8_e5m2": ("fp8_e5m2", 1, True),
    "bf16": ("bf16", 2, False),
    "bfloat16": ("bf16", 2, False),
    "fp16": ("fp16", 2, False),
    "float16": ("fp16", 2, False),
    "half": ("fp16", 2, False),
    "fp32": ("fp32", 4, False),
    "float32": ("fp32", 4, False),
    "float": ("fp32", 4, False),
}
_TORCH_DTYPES = {
    torch.float8_e4m3fn: "fp8_e4m3",
    torch.float8_e5m2: "fp8_e5m2",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
}
_DTYPE_HELP = "fp8_e4m3 (or fp8), fp8_e5m2, bf16, fp16, fp32, or the torch dtype of one of them"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Every size and count is a signed 64-bit quantity somewhere (torch, the Rust
# core): larger inputs are refused by name instead of overflowing later.
MAX_VALUE = 2**63 - 1
# More layers than any model has; a bound keeps a bogus config from building
# per-layer tuples of 10**12 entries (MemoryError) before anything is checked.
MAX_LAYERS = 1 << 16


def _shown(v: object) -> str:
    """``repr`` of a value for a message; huge ints as a power of two (repr would
    take seconds, or refuse past 4,300 digits)."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10**30:
        return f"{'-' if v < 0 else ''}~2^{abs(v).bit_length() - 1}"
    return repr(v)


def _check_int(name: str, v: object, lo: int, hi: int = MAX_VALUE) -> int:
    if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
        return int(v)
    raise InvalidArgument(
        f"{name}={_shown(v)} is out of range: it must be an integer in {lo:,}..={hi:,}"
    )


@dataclass(frozen=True)
class KVGeometry:
    """What one token costs in each layer's KV cache, independent of dtype.

    Attributes
    ----------
    num_layers : int
        Decoder layers that keep a KV cache.
    num_kv_heads : int
        KV heads per layer (GQA); 1 for MLA, whose latent all heads share.
    head_dim : int
        Elements per KV head for K (and again for V); for MLA the latent width,
        ``kv_lora_rank + qk_rope_head_dim`` elements, with no separate V.
    mla : bool
        Multi-head latent attention (DeepSeek-V2/V3): one latent per token per
        layer, replicated on every TP rank.
    layer_windows : tuple of (int or None)
        Per layer, ``None`` for full attention or the number of tokens a
        sliding- or chunked-window layer holds at most. Empty means all full.
    source : str
        Where the geometry came from (a file path, ``<dict>`` or ``fields``).
    model_type : str
        The config's ``model_type``, if any.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    mla: bool = False
    layer_windows: tuple[int | None, ...] = ()
    source: str = "fields"
    model_type: str = ""

    def __post_init__(self) -> None:
        _check_int("num_layers", self.num_layers, 1, MAX_LAYERS)
        _check_int("num_kv_heads", self.num_kv_heads, 1)
        _check_int("head_dim", self.head_dim, 1)
        if self.mla and self.num_kv_heads != 1:
            raise InvalidArgument(
                f"num_kv_heads={self.num_kv_heads} with mla=True: an MLA latent is one "
                "per token per layer, so num_kv_heads must be 1"
            )
        windows = tuple(self.layer_windows) or (None,) * self.num_layers
        if len(windows) != self.num_layers:
            raise InvalidArgument(
                f"layer_windows has {len(windows)} entries; it needs one per layer "
                f"(num_layers={self.num_layers}) or none"
            )
        for i, w in enumerate(windows):
            if w is not None:
                _check_int(f"layer_windows[{i}]", w, 1)
        object.__setattr__(self, "layer_windows", windows)

    @property
    def full_layers(self) -> int:
        """Layers that attend to the whole context (their KV grows with it)."""
        return sum(w is None for w in self.layer_windows)

    @property
    def windows(self) -> dict[int, int]:
        """``{window tokens: number of layers}`` for the windowed layers."""
        return dict(sorted(Counter(w for w in self.layer_windows if w is not None).items()))

    def kv_heads_per_device(self, tp: int) -> int:
        """KV heads each of ``tp`` ranks holds.

        Heads are split evenly when ``tp <= num_kv_heads`` (``tp`` must divide
        them) and each rank holds one, replicated, when ``tp > num_kv_heads``
        (then ``num_kv_heads`` must divide ``tp``). An MLA latent is on every rank.
        """
        tp = _check_int("tp", tp, 1)
        h = self.num_kv_heads
        if self.mla:
            return 1
        if tp <= h:
            if h % tp:
                raise InvalidArgument(
                    f"tp={tp} does not divide num_kv_heads={h}: use a divisor of {h} "
                    f"or a multiple of it"
                )
            return h // tp
        if tp % h:
            raise InvalidArgument(
                f"tp={tp} is above num_kv_heads={h} but not a multiple of it, so heads "
                f"cannot be replicated evenly: use a divisor or a multiple of {h}"
            )
        return 1

    def elements_per_token_per_layer(self, kv_heads: int | None = None) -> int:
        """KV elements one token adds to one layer (K and V together; MLA: the latent)."""
        if self.mla:
            return self.head_dim
        return 2 * (self.num_kv_heads if kv_heads is None else kv_heads) * self.head_dim

    def scales_per_token_per_layer(self, kv_heads: int | None = None) -> int:
        """FP8 scales one token adds to one layer: per KV head for K and for V (MLA: one)."""
        if self.mla:
            return 1
        return 2 * (self.num_kv_heads if kv_heads is None else kv_heads)

    def token_layers(self, context: int) -> int:
        """Sum over layers of tokens held at ``context`` (windowed layers capped)."""
        return sum(min(context, w) if w is not None else context for w in self.layer_windows)

    def describe(self) -> str:
        """One line: layers, attention kind and per-layer KV shape."""
        name = f"{self.model_type} " if self.model_type else ""
        if self.windows:
            parts = ", ".join(f"{n} windowed at {w:,} tokens" for w, n in self.windows.items())
            layers = f"{self.num_layers} layers ({self.full_layers} full attention, {parts})"
        else:
            layers = f"{self.num_layers} layers, all full attention"
        if self.mla:
            attn = f"MLA, one latent of {self.head_dim} elements per token per layer"
        else:
            attn = f"{self.num_kv_heads} KV heads x head_dim {self.head_dim}"
        return f"{name}({self.source}): {layers}; {attn}"


#: What :func:`kv_geometry` and :func:`plan` accept as ``config``.
ConfigLike = str | os.PathLike[str] | Mapping[str, Any] | KVGeometry


def _load(config: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "<dict>"
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InvalidArgument(f"cannot read config {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise InvalidArgument(
            f"config {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason})"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"config {str(path)!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidArgument(
            f"config {str(path)!r} nests JSON too deeply to be a model config"
        ) from None
    if not isinstance(data, dict):
        raise InvalidArgument(
            f"config {str(path)!r} holds a JSON {type(data).__name__}, not an object"
        )
    return data, str(path)


def _get(cfg: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any] | None:
    for k in keys:
        if cfg.get(k) is not None:
            return k, cfg[k]
    return None


def _field(cfg: Mapping[str, Any], keys: Sequence[str], where: str) -> int | None:
    found = _get(cfg, keys)
    if found is None:
        return None
    key, v = found
    if not _is_int(v) or v < 1:
        raise InvalidArgument(f"{where}: {key}={_shown(v)} must be a positive integer")
    return _check_int(f"{where}: {key}", v, 1)


def _required(cfg: Mapping[str, Any], keys: Sequence[str], where: str, hint: str) -> int:
    v = _field(cfg, keys, where)
    if v is None:
        also = f" (or {', '.join(repr(k) for k in keys[1:])})" if len(keys) > 1 else ""
        raise InvalidArgument(
            f"{where}: missing field {keys[0]!r}{also}; name it with plan({hint}=...)"
        )
    return v


def _layer_windows(cfg: Mapping[str, Any], n: int, where: str) -> tuple[int | None, ...]:
    chunk = _field(cfg, ("attention_chunk_size",), where)
    declared = _field(cfg, ("sliding_window",), where)
    # Qwen2 declares a window but turns it off; explicit layer_types still win.
    sliding = None if cfg.get("use_sliding_window") is False else declared
    types = cfg.get("layer_types")
    if types is not None:
        if (
            isinstance(types, (str, bytes))
            or not isinstance(types, Sequence)
            or len(types) != n
            or not all(isinstance(t, str) for t in types)
        ):
            raise InvalidArgument(
                f"{where}: layer_types must be a list of {n} strings (one per layer), got {types!r}"
            )
        out: list[int | None] = []
        for i, t in enumerate(types):
            if t in _FULL_TYPES:
                out.append(None)
            elif t in _CHUNKED_TYPES or t in _SLIDING_TYPES:
                chunked = t in _CHUNKED_TYPES
                w = chunk if chunked else declared
                key = "attention_chunk_size" if chunked else "sliding_window"
                if w is None:
                    raise InvalidArgument(
                        f"{where}: layer_types[{i}]={t!r} but {key!r} is missing; "
                        f"name it with plan({key}=...)"
                    )
                out.append(w)
            else:
                known = sorted(_FULL_TYPES | _SLIDING_TYPES | _CHUNKED_TYPES)
                raise InvalidArgument(
                    f"{where}: layer_types[{i}]={t!r} is not an attention type the "
                    f"planner knows; known: {', '.join(known)}"
                )
        return tuple(out)
    if chunk is not None:
        # Llama-4: no_rope_layers[i] == 1 marks a RoPE layer, which attends within
        # its chunk; the NoPE layers (by default every 4th) attend globally.
        flags = cfg.get("no_rope_layers")
        if flags:
            if (
                not isinstance(flags, Sequence)
                or len(flags) != n
                or not all(f in (0, 1) for f in flags)
            ):
                raise InvalidArgument(
                    f"{where}: no_rope_layers must be {n} zeros and ones, got {flags!r}"
                )
            return tuple(chunk if f else None for f in flags)
        every = _field(cfg, ("no_rope_layer_interval",), where) or 4
        return tuple(chunk if (i + 1) % every else None for i in range(n))
    if sliding is not None:
        pattern = _field(cfg, ("sliding_window_pattern", "_sliding_window_pattern"), where)
        if pattern is not None:  # Gemma-3, Cohere2: every pattern-th layer is global
            return tuple(sliding if (i + 1) % pattern else None for i in range(n))
        if cfg.get("model_type") == "gemma2":  # alternating, starting with a sliding layer
            return tuple(sliding if i % 2 == 0 else None for i in range(n))
        if "use_sliding_window" in cfg and cfg.get("max_window_layers") is not None:
            first = cfg["max_window_layers"]  # Qwen2: layers from here on slide
            if not _is_int(first) or first < 0:
                raise InvalidArgument(
                    f"{where}: max_window_layers={first!r} must be a non-negative integer"
                )
            return tuple(sliding if i >= first else None for i in range(n))
        return (sliding,) * n  # Mistral-7B-v0.1, Phi-3: every layer slides
    return (None,) * n


def kv_geometry(
    config: ConfigLike | None = None,
    *,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    num_attention_heads: int | None = None,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    sliding_window: int | None = None,
    attention_chunk_size: int | None = None,
    layer_types: Sequence[str] | None = None,
) -> KVGeometry:
    """Read the KV geometry from an HF ``config.json``, a loaded dict, or named fields.

    ``config`` is a path to ``config.json`` (or to the directory holding it), a
    dict already loaded, or ``None`` to use the keywords alone. Keywords given
    together with a config override the config's fields. A config that nests
    its language model under ``text_config`` (Llama-4, Gemma-3) is read there.

    * GQA: ``num_key_value_heads`` (default ``num_attention_heads``) heads of
      ``head_dim`` (default ``hidden_size // num_attention_heads``) for K and V.
    * MLA (``kv_lora_rank`` set: DeepSeek-V2/V3): one latent of
      ``kv_lora_rank + qk_rope_head_dim`` elements per token per layer.
    * Windowed layers: ``layer_types``; Llama-4's ``attention_chunk_size`` with
      ``no_rope_layers`` (default: every 4th layer global); ``sliding_window``
      with ``sliding_window_pattern`` (Gemma-3), alternating (Gemma-2),
      ``max_window_layers`` (Qwen2, when ``use_sliding_window``) or on every
      layer (Mistral-7B-v0.1).

    Raises :class:`radixseg.InvalidArgument` naming the field and the file when
    a field is missing or malformed.

    >>> g = kv_geometry({"num_hidden_layers": 32, "num_attention_heads": 32,
    ...                  "num_key_value_heads": 8, "hidden_size": 4096})
    >>> g.num_layers, g.num_kv_heads, g.head_dim, g.elements_per_token_per_layer()
    (32, 8, 128, 2048)
    >>> kv_geometry(num_layers=61, kv_lora_rank=512, qk_rope_head_dim=64).head_dim
    576
    """
    overrides = {
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "num_attention_heads": num_attention_heads,
        "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": qk_rope_head_dim,
        "sliding_window": sliding_window,
        "attention_chunk_size": attention_chunk_size,
        "layer_types": None if layer_types is None else list(layer_types),
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    named = {
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "num_attention_heads": num_attention_heads,
        "kv_lora_rank": kv_lora_rank,
        "qk_rope_head_dim": qk_rope_head_dim,
        "sliding_window": sliding_window,
        "attention_chunk_size": attention_chunk_size,
    }
    for name, value in named.items():
        if value is not None:
            _check_int(name, value, 1)
    if isinstance(config, KVGeometry):
        if given:
            raise InvalidArgument(
                f"fields {sorted(given)} cannot override a KVGeometry; pass a config or fields"
            )
        return config
    if config is None:
        cfg: dict[str, Any] = {}
        source, where = "fields", "fields"
    else:
        cfg, source = _load(config)
        where = f"config {source}"
        if _get(cfg, _LAYERS) is None:
            for key in _NESTED:
                sub = cfg.get(key)
                if isinstance(sub, Mapping) and _get(sub, _LAYERS) is not None:
                    cfg = {"model_type": cfg.get("model_type"), **sub}
                    where = f"config {source} ({key})"
                    break
    cfg.update(given)
    model_type = str(cfg.get("model_type") or "")
    n = _check_int(f"{where}: layers", _required(cfg, _LAYERS, where, "num_layers"), 1, MAX_LAYERS)
    windows = _layer_windows(cfg, n, where)
    if cfg.get("kv_lora_rank") is not None:
        rank = _required(cfg, ("kv_lora_rank",), where, "kv_lora_rank")
        rope = _required(cfg, ("qk_rope_head_dim",), where, "qk_rope_head_dim")
        return KVGeometry(n, 1, rank + rope, True, windows, source, model_type)
    kv = _field(cfg, _KV_HEADS, where)
    dim = _field(cfg, ("head_dim",), where)
    heads = None
    if kv is None or dim is None:
        heads = _required(cfg, _HEADS, where, "num_kv_heads" if kv is None else "head_dim")
    if kv is None:
        assert heads is not None
        kv = heads
    if dim is None:
        assert heads is not None
        hidden = _required(cfg, _HIDDEN, where, "head_dim")
        if hidden % heads:
            raise InvalidArgument(
                f"{where}: hidden_size={hidden} is not a multiple of "
                f"num_attention_heads={heads}; name head_dim with plan(head_dim=...)"
            )
        dim = hidden // heads
    return KVGeometry(n, kv, dim, False, windows, source, model_type)


def _dtype(kv_dtype: object) -> tuple[str, int, bool]:
    if isinstance(kv_dtype, torch.dtype):
        name = _TORCH_DTYPES.get(kv_dtype)
        if name is None:
            raise InvalidArgument(f"kv_dtype={kv_dtype} is not supported; use {_DTYPE_HELP}")
        return _DTYPES[name]
    if isinstance(kv_dtype, str):
        key = kv_dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise InvalidArgument(f"kv_dtype={kv_dtype!r} is not supported; use {_DTYPE_HELP}")


_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_COUNT_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}
_NUMBER = re.compile(r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*")


def _parse(text: str | int, what: str, units: Mapping[str, int], example: str) -> int:
    if _is_int(text):
        return _check_int(what, text, 0)
    m = _NUMBER.fullmatch(text) if isinstance(text, str) else None
    unit = units.get(m.group(2).lower()) if m else None
    if m is None or unit is None:
        names = ", ".join(u for u in units if u)
        raise InvalidArgument(
            f"{what}={text!r} is not understood: give a whole number, optionally with "
            f"a unit ({names}; case-insensitive), e.g. {example}"
        )
    try:
        value = Decimal(m.group(1).replace("_", "").replace(",", "")) * unit
    except InvalidOperation:
        raise InvalidArgument(f"{what}={text!r} is not a number") from None
    if value > MAX_VALUE:
        raise InvalidArgument(f"{what}={text!r} is past the limit of {MAX_VALUE:,} (2^63 - 1)")
    if value != value.to_integral_value():
        raise InvalidArgument(f"{what}={text!r} is not a whole number ({value})")
    return int(value)


def parse_bytes(text: str | int, what: str = "size") -> int:
    """Bytes from ``80GB`` (10^9), ``80GiB`` (2^30), ``1.5TB``, ``85_899_345_920`` or an int.

    >>> parse_bytes("80GB"), parse_bytes("80GiB"), parse_bytes("64MiB")
    (80000000000, 85899345920, 67108864)
    """
    return _parse(text, what, _BYTE_UNITS, "80GB or 80GiB")


def parse_count(text: str | int, what: str = "count") -> int:
    """Tokens from ``10000000``, ``10_000_000``, ``10M`` (10^6), ``10Mi`` (2^20) or an int.

    >>> parse_count("10M"), parse_count("128Ki"), parse_count("1e7")
    (10000000, 131072, 10000000)
    """
    return _parse(text, what, _COUNT_UNITS, "10000000 or 10M")


@dataclass(frozen=True)
class Plan:
    """A KV capacity plan; every size in bytes, every context in tokens.

    Per-token figures are split by kind. ``kv_*`` are the K/V (or MLA latent)
    bytes; ``scale_*`` are the float32 scales radixseg stores beside FP8 KV
    (zero for bf16/fp16/fp32), kept apart so the KV figures compare with other
    engines. ``*_per_token`` counts full-attention layers only: their bytes grow
    with the context. ``window_*_per_token`` is what windowed layers add per
    token until their window fills; after that they stay flat. ``*_per_device``
    is what one of ``tp`` ranks holds (KV heads split, or replicated when
    ``tp > num_kv_heads``; an MLA latent is on every rank); the others are
    for one copy of the whole model.

    The fit (``usable_bytes_per_device``, ``max_context_per_device``,
    ``devices_needed``) counts KV and scales against
    ``device_bytes * memory_fraction - weights_bytes / tp``; it is ``None``
    when ``device_bytes`` is not given. ``max_context_per_device`` is also
    ``None`` when every layer is windowed and the windows fit (no limit), and
    is rounded down to whole pages. ``devices_needed`` is ``tp`` times the
    number of TP groups that split the context between them (context
    parallelism), each group holding the weights once.
    """

    geometry: KVGeometry
    kv_dtype: str
    dtype_bytes: int
    tp: int
    context: int
    page_size: int
    segment_bytes: int
    device_bytes: int | None
    weights_bytes: int
    memory_fraction: float
    kv_heads_per_device: int
    kv_bytes_per_token: int
    kv_bytes_per_token_per_device: int
    window_kv_bytes_per_token: int
    window_kv_bytes_per_token_per_device: int
    scale_bytes_per_token: int
    scale_bytes_per_token_per_device: int
    window_scale_bytes_per_token: int
    window_scale_bytes_per_token_per_device: int
    pages_per_segment: int
    tokens_per_segment: int
    context_kv_bytes: int
    context_kv_bytes_per_device: int
    context_scale_bytes: int
    context_scale_bytes_per_device: int
    usable_bytes_per_device: int | None
    max_context_per_device: int | None
    devices_needed: int | None

    def kv_bytes(self, context: int, per_device: bool = False) -> int:
        """KV bytes (no scales) for ``context`` tokens, windowed layers capped."""
        heads = self.kv_heads_per_device if per_device else None
        g = self.geometry
        return g.token_layers(context) * g.elements_per_token_per_layer(heads) * self.dtype_bytes

    def scale_bytes(self, context: int, per_device: bool = False) -> int:
        """FP8 scale bytes for ``context`` tokens (0 unless the KV dtype is FP8)."""
        if self.scale_bytes_per_token == 0 and self.window_scale_bytes_per_token == 0:
            return 0
        heads = self.kv_heads_per_device if per_device else None
        g = self.geometry
        return g.token_layers(context) * g.scales_per_token_per_layer(heads) * SCALE_BYTES

    def as_dict(self) -> dict[str, Any]:
        """Every field as plain JSON-ready values (the geometry as a nested dict)."""
        d = dataclasses.asdict(self)
        d["geometry"]["layer_windows"] = list(self.geometry.layer_windows)
        return d

    def table(self) -> str:
        """A readable report: thousands separators, GB (10^9 B) with GiB (2^30 B)."""
        g = self.geometry
        tp = self.tp
        scaled = self.scale_bytes_per_token or self.window_scale_bytes_per_token
        rows: list[tuple[str, str]] = [
            ("model", g.describe()),
            ("KV dtype", f"{self.kv_dtype}, {self.dtype_bytes} B per element"),
        ]
        if g.mla:
            shard = "the MLA latent is replicated on every device"
        elif tp > g.num_kv_heads:
            shard = (
                f"1 KV head per device, each of the {g.num_kv_heads} replicated "
                f"on {tp // g.num_kv_heads} devices"
            )
        else:
            shard = f"{self.kv_heads_per_device} of {g.num_kv_heads} KV heads per device"
        rows.append(("tensor parallel", f"tp={tp}: {shard}"))
        rows.append(("", ""))
        rows.append(
            (
                "KV per token",
                f"{self.kv_bytes_per_token:,} B/token whole model, "
                f"{self.kv_bytes_per_token_per_device:,} B/token per device"
                + (f" ({g.full_layers} full-attention layers)" if g.windows else ""),
            )
        )
        if g.windows:
            widest = max(g.windows)
            flat = self.kv_bytes(widest) - self.kv_bytes_per_token * widest
            rows.append(
                (
                    "  windowed",
                    f"+{self.window_kv_bytes_per_token:,} B/token whole model, "
                    f"+{self.window_kv_bytes_per_token_per_device:,} B/token per device "
                    f"until the window fills, then flat at {_gb(flat)} whole model",
                )
            )
        if scaled:
            rows.append(
                (
                    "FP8 scales",
                    f"{self.scale_bytes_per_token:,} B/token whole model, "
                    f"{self.scale_bytes_per_token_per_device:,} B/token per device"
                    + (
                        f" (windowed: +{self.window_scale_bytes_per_token:,} and "
                        f"+{self.window_scale_bytes_per_token_per_device:,})"
                        if g.windows
                        else ""
                    )
                    + (
                        "; float32, one per token per layer"
                        if g.mla
                        else "; float32 per (token, KV head) for K and for V"
                    )
                    + ", radixseg's extra, not in the KV figures",
                )
            )
        else:
            rows.append(("FP8 scales", "none (the KV dtype is not FP8)"))
        rows.append(
            (
                "segment",
                f"{_size(self.segment_bytes)} per device = {self.pages_per_segment:,} pages "
                f"x {self.page_size} tokens = {self.tokens_per_segment:,} tokens",
            )
        )
        rows.append(("", ""))
        ctx = self.context
        rows.append(("context", f"{ctx:,} tokens"))
        rows.append(
            (
                "KV",
                f"{_gb(self.context_kv_bytes_per_device)} per device, "
                f"{_gb(self.context_kv_bytes)} whole model",
            )
        )
        if scaled:
            rows.append(
                (
                    "FP8 scales",
                    f"{_gb(self.context_scale_bytes_per_device)} per device, "
                    f"{_gb(self.context_scale_bytes)} whole model",
                )
            )
            rows.append(
                (
                    "KV + scales",
                    f"{_gb(self.context_kv_bytes_per_device + self.context_scale_bytes_per_device)}"
                    f" per device, {_gb(self.context_kv_bytes + self.context_scale_bytes)}"
                    " whole model",
                )
            )
        rows.append(("", ""))
        if self.device_bytes is None or self.usable_bytes_per_device is None:
            rows.append(
                (
                    "fit",
                    "give device_bytes (--device-memory) to see the largest context "
                    "and the devices needed",
                )
            )
        else:
            rows.append(
                (
                    "device memory",
                    f"{_gb(self.device_bytes)} x memory fraction {self.memory_fraction:.2f}"
                    + (" (the default: all of it)" if self.memory_fraction == 1 else "")
                    + f" - weights {_gb(self.weights_bytes)} / tp {tp}"
                    f" = {_gb(max(0, self.usable_bytes_per_device))} for KV + scales per device",
                )
            )
            if self.usable_bytes_per_device <= 0:
                rows.append(("largest context", "0 tokens: the weights alone fill the device"))
                rows.append(("devices needed", "none fit: raise tp or the device memory"))
            elif self.max_context_per_device is None:
                rows.append(("largest context", "no limit: every layer is windowed"))
                rows.append(("devices needed", f"{self.devices_needed} (one TP group)"))
            else:
                rows.append(
                    (
                        "largest context",
                        f"{self.max_context_per_device:,} tokens "
                        f"(KV + scales, whole pages of {self.page_size})",
                    )
                )
                groups = (self.devices_needed or 0) // tp
                rows.append(
                    (
                        "devices needed",
                        f"{self.devices_needed:,} for {ctx:,} tokens: {groups:,} "
                        f"context-parallel group{'s' if groups != 1 else ''} x tp {tp}",
                    )
                )
        width = max(len(k) for k, _ in rows) + 2
        lines = ["radixseg capacity plan"]
        lines += [f"{k:<{width}}{v}".rstrip() if k or v else "" for k, v in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _gb(n: int) -> str:
    if n >= 10**9:
        return f"{n / 1e9:,.1f} GB ({n / 2**30:,.1f} GiB)"
    if n >= 10**6:
        return f"{n / 1e6:,.1f} MB ({n / 2**20:,.1f} MiB)"
    return f"{n:,} B"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale:,} {unit}"
    return f"{n:,} B"


def plan(
    config: ConfigLike | None = None,
    *,
    kv_dtype: str | torch.dtype = "fp8_e4m3",
    device_bytes: int | str | None = None,
    weights_bytes: int | str = 0,
    tp: int = 1,
    context: int = 10_000_000,
    page_size: int = 16,
    segment_bytes: int | str = 64 << 20,
    memory_fraction: float = 1.0,
    num_layers: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    kv_lora_rank: int | None = None,
    qk_rope_head_dim: int | None = None,
    sliding_window: int | None = None,
    attention_chunk_size: int | None = None,
    layer_types: Sequence[str] | None = None,
) -> Plan:
    """Plan KV capacity for a model: bytes per token, per context, and what fits.

    Parameters
    ----------
    config : path, dict or KVGeometry, optional
        An HF ``config.json`` (see :func:`kv_geometry`); or ``None`` and name
        the fields (``num_layers``, ``num_kv_heads``, ``head_dim``, MLA's
        ``kv_lora_rank`` and ``qk_rope_head_dim``, windows), which otherwise
        override the config's.
    kv_dtype : str or torch.dtype
        ``"fp8_e4m3"`` (default; ``"fp8"``), ``"fp8_e5m2"``, ``"bf16"``,
        ``"fp16"``, ``"fp32"`` or the matching torch dtype. FP8 adds radixseg's
        float32 scales, reported separately.
    device_bytes : int or str, optional
        Memory of one device in bytes (``"80GB"``, ``"80GiB"`` accepted).
        Without it the plan has no fit figures.
    weights_bytes : int or str
        Bytes of the model weights, split evenly over the ``tp`` ranks.
    tp : int
        Tensor-parallel degree (>= 1); it must divide ``num_kv_heads`` or be a
        multiple of it.
    context : int
        Tokens of the context to size (>= 1); default 10,000,000.
    page_size : int
        Tokens per page, a power of two in 1..=1024.
    segment_bytes : int or str
        Bytes of one segment on one device; default 64 MiB.
    memory_fraction : float
        Share of ``device_bytes`` the KV cache and the weights may use, in
        (0, 1]. Default 1.0: the whole device, no headroom for activations
        (vLLM's ``gpu_memory_utilization`` defaults to 0.9).

    Returns
    -------
    Plan
        See :class:`Plan` for every figure.

    Raises
    ------
    radixseg.InvalidArgument
        For an unknown dtype, an out-of-range number, a TP degree that does not
        fit the KV heads, or a missing config field; the message names the
        value and what is allowed.

    Examples
    --------
    Llama-3.1-70B (80 layers, 8 KV heads of 128) in FP8 at TP 8:

    >>> p = plan(num_layers=80, num_kv_heads=8, head_dim=128, kv_dtype="fp8", tp=8)
    >>> p.kv_bytes_per_token, p.kv_bytes_per_token_per_device, p.scale_bytes_per_token
    (163840, 20480, 5120)
    >>> p.context_kv_bytes_per_device / 1e9  # GB of KV per device at 10M tokens
    204.8
    >>> plan(p.geometry, kv_dtype="fp8", tp=8, device_bytes="80GB",
    ...      weights_bytes="140GB").max_context_per_device
    2959280
    """
    name, dtype_bytes, fp8 = _dtype(kv_dtype)
    g = kv_geometry(
        config,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        sliding_window=sliding_window,
        attention_chunk_size=attention_chunk_size,
        layer_types=layer_types,
    )
    tp = _check_int("tp", tp, 1)
    context = _check_int("context", context, 1)
    page_size = _check_int("page_size", page_size, 1, 1024)
    if page_size & (page_size - 1):
        raise InvalidArgument(f"page_size={page_size} must be a power of two in 1..=1024")
    segment_bytes = _check_int("segment_bytes", parse_bytes(segment_bytes, "segment_bytes"), 1)
    weights_bytes = parse_bytes(weights_bytes, "weights_bytes")
    device = None if device_bytes is None else parse_bytes(device_bytes, "device_bytes")
    if device is not None:
        device = _check_int("device_bytes", device, 1)
    if (
        isinstance(memory_fraction, bool)
        or not isinstance(memory_fraction, (int, float))
        or not 0 < memory_fraction <= 1
    ):
        raise InvalidArgument(f"memory_fraction={memory_fraction!r} must be in (0, 1]")
    heads = g.kv_heads_per_device(tp)

    full, windowed = g.full_layers, g.num_layers - g.full_layers
    kv_layer = g.elements_per_token_per_layer() * dtype_bytes
    kv_layer_dev = g.elements_per_token_per_layer(heads) * dtype_bytes
    sc_layer = g.scales_per_token_per_layer() * SCALE_BYTES if fp8 else 0
    sc_layer_dev = g.scales_per_token_per_layer(heads) * SCALE_BYTES if fp8 else 0

    # A segment holds the same tokens in every layer of the pool that grows with
    # the context: the full-attention layers (the windowed ones when there are none).
    seg_layers = full or windowed
    per_page = page_size * seg_layers * (kv_layer_dev + sc_layer_dev)
    pages_per_segment = segment_bytes // per_page
    if pages_per_segment < 1:
        raise InvalidArgument(
            f"segment_bytes={segment_bytes:,} is smaller than one page ({per_page:,} B: "
            f"{page_size} tokens x {per_page // page_size:,} B/token per device); "
            "raise segment_bytes or lower page_size"
        )

    token_layers = g.token_layers(context)
    dev_rate = kv_layer_dev + sc_layer_dev

    usable: int | None = None
    max_ctx: int | None = None
    devices: int | None = None
    if device is not None:
        usable = int(device * memory_fraction) - math.ceil(weights_bytes / tp)
        if usable <= 0:
            max_ctx = 0
        else:
            max_ctx = _largest(lambda c: g.token_layers(c) * dev_rate, usable, full * dev_rate, g)
            if max_ctx is not None:
                max_ctx -= max_ctx % page_size
        if max_ctx is None:
            devices = tp
        elif max_ctx > 0:
            devices = tp * -(-context // max_ctx)

    return Plan(
        geometry=g,
        kv_dtype=name,
        dtype_bytes=dtype_bytes,
        tp=tp,
        context=context,
        page_size=page_size,
        segment_bytes=segment_bytes,
        device_bytes=device,
        weights_bytes=weights_bytes,
        memory_fraction=float(memory_fraction),
        kv_heads_per_device=heads,
        kv_bytes_per_token=full * kv_layer,
        kv_bytes_per_token_per_device=full * kv_layer_dev,
        window_kv_bytes_per_token=windowed * kv_layer,
        window_kv_bytes_per_token_per_device=windowed * kv_layer_dev,
        scale_bytes_per_token=full * sc_layer,
        scale_bytes_per_token_per_device=full * sc_layer_dev,
        window_scale_bytes_per_token=windowed * sc_layer,
        window_scale_bytes_per_token_per_device=windowed * sc_layer_dev,
        pages_per_segment=pages_per_segment,
        tokens_per_segment=pages_per_segment * page_size,
        context_kv_bytes=token_layers * kv_layer,
        context_kv_bytes_per_device=token_layers * kv_layer_dev,
        context_scale_bytes=token_layers * sc_layer,
        context_scale_bytes_per_device=token_layers * sc_layer_dev,
        usable_bytes_per_device=usable,
        max_context_per_device=max_ctx,
        devices_needed=devices,
    )


def _largest(cost: Callable[[int], int], budget: int, slope: int, g: KVGeometry) -> int | None:
    """The largest context ``c`` with ``cost(c) <= budget``; ``None`` when unbounded.

    ``cost`` is non-decreasing and at least ``slope * c``: linear in the
    full-attention layers plus windowed layers that stay flat once full.
    """
    if slope == 0:  # every layer is windowed: the cost stops growing at the widest window
        hi = max(g.windows)
        if cost(hi) <= budget:
            return None
    else:
        hi = budget // slope + 1  # cost(hi) >= slope * hi > budget
    lo = 0  # invariant: cost(lo) <= budget < cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= budget:
            lo = mid
        else:
            hi = mid
    return lo
