"""The KV geometry of a model, read from its Hugging Face config.

:func:`kv_geometry` is radixseg's one reader of HF configs: a ``config.json``
path, a loaded dict, or fields named directly become a :class:`KVGeometry` —
layers, KV heads, head dimension, multi-head latent attention (MLA), and which
layers attend only to a window of recent tokens. Nothing here knows dtypes or
devices; :func:`radixseg.capacity.plan` adds those.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from radixseg._core import InvalidArgument
from radixseg.capacity.units import _check_int, _is_int, _shown

__all__ = ["MAX_LAYERS", "ConfigLike", "HFConfig", "KVGeometry", "kv_geometry"]

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
# Every field kv_geometry reads, for configs given as objects: those that size
# a layer's KV, and those that only say which layers are windowed.
_SIZE_FIELDS = (
    *_LAYERS,
    *_HEADS,
    *_KV_HEADS,
    *_HIDDEN,
    "head_dim",
    "model_type",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "multi_query",
    "new_decoder_architecture",
)
_WINDOW_FIELDS = (
    "layer_types",
    "sliding_window",
    "use_sliding_window",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "max_window_layers",
    "attention_chunk_size",
    "no_rope_layers",
    "no_rope_layer_interval",
)
_ABSENT = object()
# More layers than any model has; a bound keeps a bogus config from building
# per-layer tuples of 10**12 entries (MemoryError) before anything is checked.
MAX_LAYERS = 1 << 16


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
    layer_kinds : tuple of str
        Per layer, ``"full"``, ``"sliding"`` (sees the last ``window`` keys,
        its own included) or ``"chunked"`` (sees its own ``window``-token
        chunk, counted from the first token). Empty: ``"sliding"`` where a
        window is given, else ``"full"``.
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
    layer_kinds: tuple[str, ...] = ()

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
        kinds = tuple(self.layer_kinds) or tuple(
            "full" if w is None else "sliding" for w in windows
        )
        if len(kinds) != self.num_layers:
            raise InvalidArgument(
                f"layer_kinds has {len(kinds)} entries; it needs one per layer "
                f"(num_layers={self.num_layers}) or none"
            )
        for i, (k, w) in enumerate(zip(kinds, windows, strict=True)):
            if k not in ("full", "sliding", "chunked") or (k == "full") != (w is None):
                raise InvalidArgument(
                    f"layer {i} is {k!r} with window {w}: a layer is 'full' without a window, "
                    f"'sliding' or 'chunked' with one"
                )
        object.__setattr__(self, "layer_kinds", kinds)

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


class HFConfig(Protocol):
    """A loaded config object: transformers' ``PretrainedConfig`` or alike."""

    def to_dict(self) -> dict[str, Any]: ...


#: What :func:`kv_geometry` and :func:`plan` accept as ``config``.
ConfigLike = str | os.PathLike[str] | Mapping[str, Any] | HFConfig | KVGeometry


def _as_dict(config: HFConfig) -> dict[str, Any]:
    """``config.to_dict()``, with the fields read here taken from the object's
    attributes where it has them: the model's code reads those, and they can
    differ from the dict (``attribute_map`` aliases, properties such as
    Falcon's ``head_dim``, layer lists rewritten on load)."""
    cfg = dict(config.to_dict())
    for key in (*_SIZE_FIELDS, *_WINDOW_FIELDS):
        try:
            value = getattr(config, key, _ABSENT)
        except Exception as e:  # transformers refuses per-layer fields (Gemma-4's head_dim)
            if key in _WINDOW_FIELDS:
                continue  # the dict's value stands: a window caps a size, never sets one
            raise InvalidArgument(f"config {type(config).__name__}: {key}: {e}") from None
        if value is not _ABSENT:
            cfg[key] = value
    return cfg


def _load(
    config: str | os.PathLike[str] | Mapping[str, Any] | HFConfig,
) -> tuple[dict[str, Any], str]:
    if isinstance(config, Mapping):
        return dict(config), "<dict>"
    if not isinstance(config, (str, os.PathLike)):
        if not callable(getattr(config, "to_dict", None)):
            raise InvalidArgument(
                f"config of type {type(config).__name__} is not a path, a dict, a "
                "transformers config or a KVGeometry"
            )
        return _as_dict(config), type(config).__name__
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


def _window(cfg: Mapping[str, Any], where: str) -> int | None:
    return _field(cfg, ("sliding_window",), where)


_FULL: tuple[int | None, str] = (None, "full")


def _layer_spans(cfg: Mapping[str, Any], n: int, where: str) -> tuple[tuple[int | None, str], ...]:
    """Per layer, its window (``None``: full) and kind (``full``/``sliding``/``chunked``)."""
    chunk = _field(cfg, ("attention_chunk_size",), where)
    # Qwen2 declares a window but turns it off (Qwen2-MoE's transformers config
    # then holds 0); explicit layer_types still win. The window is read only
    # where a layer uses it.
    sliding = None if cfg.get("use_sliding_window") is False else _window(cfg, where)
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
        out: list[tuple[int | None, str]] = []
        for i, t in enumerate(types):
            if t in _FULL_TYPES:
                out.append((None, "full"))
            elif t in _CHUNKED_TYPES or t in _SLIDING_TYPES:
                chunked = t in _CHUNKED_TYPES
                w = chunk if chunked else _window(cfg, where)
                key = "attention_chunk_size" if chunked else "sliding_window"
                if w is None:
                    raise InvalidArgument(
                        f"{where}: layer_types[{i}]={t!r} but {key!r} is missing; "
                        f"name it with plan({key}=...)"
                    )
                out.append((w, "chunked" if chunked else "sliding"))
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
            return tuple((chunk, "chunked") if f else _FULL for f in flags)
        every = _field(cfg, ("no_rope_layer_interval",), where) or 4
        return tuple((chunk, "chunked") if (i + 1) % every else _FULL for i in range(n))
    if sliding is not None:
        pattern = _field(cfg, ("sliding_window_pattern", "_sliding_window_pattern"), where)
        if pattern is not None:  # Gemma-3, Cohere2: every pattern-th layer is global
            return tuple((sliding, "sliding") if (i + 1) % pattern else _FULL for i in range(n))
        if cfg.get("model_type") == "gemma2":  # alternating, starting with a sliding layer
            return tuple((sliding, "sliding") if i % 2 == 0 else _FULL for i in range(n))
        if "use_sliding_window" in cfg and cfg.get("max_window_layers") is not None:
            first = cfg["max_window_layers"]  # Qwen2: layers from here on slide
            if not _is_int(first) or first < 0:
                raise InvalidArgument(
                    f"{where}: max_window_layers={first!r} must be a non-negative integer"
                )
            return tuple((sliding, "sliding") if i >= first else _FULL for i in range(n))
        return ((sliding, "sliding"),) * n  # Mistral-7B-v0.1, Phi-3: every layer slides
    return (_FULL,) * n


def _multi_query(cfg: Mapping[str, Any]) -> bool:
    """One K/V head shared by every query head, whatever the head counts say.

    Falcon's ``multi_query`` (on by default; the 40B ``new_decoder_architecture``
    reads ``num_kv_heads`` instead) and GPTBigCode's (StarCoder) when no
    ``num_key_value_heads`` is named.
    """
    if cfg.get("model_type") == "falcon":
        return not cfg.get("new_decoder_architecture") and bool(cfg.get("multi_query", True))
    return bool(cfg.get("multi_query")) and cfg.get("num_key_value_heads") is None


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
    dict already loaded, a transformers ``PretrainedConfig`` (read through its
    ``to_dict()``), or ``None`` to use the keywords alone. Keywords given
    together with a config override the config's fields. A config that nests
    its language model under ``text_config`` (Llama-4, Gemma-3) is read there.

    * GQA: ``num_key_value_heads`` (default ``num_attention_heads``) heads of
      ``head_dim`` (default ``hidden_size // num_attention_heads``) for K and V;
      one head for multi-query attention (Falcon-7B, GPTBigCode).
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
    # Fields named here override the config's, under the config's names.
    renamed = {"num_layers": "num_hidden_layers", "num_kv_heads": "num_key_value_heads"}
    given: dict[str, Any] = {renamed.get(k, k): v for k, v in named.items() if v is not None}
    if layer_types is not None:
        given["layer_types"] = list(layer_types)
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
    spans = _layer_spans(cfg, n, where)
    windows = tuple(w for w, _ in spans)
    kinds = tuple(k for _, k in spans)
    if cfg.get("kv_lora_rank") is not None:
        rank = _required(cfg, ("kv_lora_rank",), where, "kv_lora_rank")
        rope = _required(cfg, ("qk_rope_head_dim",), where, "qk_rope_head_dim")
        return KVGeometry(n, 1, rank + rope, True, windows, source, model_type, kinds)
    kv = 1 if "num_key_value_heads" not in given and _multi_query(cfg) else None
    kv = kv or _field(cfg, _KV_HEADS, where)
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
    return KVGeometry(n, kv, dim, False, windows, source, model_type, kinds)
