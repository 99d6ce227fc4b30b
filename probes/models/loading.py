"""Load any supported MLLM offline: one call, an HF id or a local directory -> `LoadedModel`.

A `LoadedModel` holds the HF model, its processor/tokenizer, the family adapter, and a hook backend under
transformer-lens names. The TransformerBridge is built on first use of `.bridge` (it rewraps the HF model in
place); capture uses the lighter torch backend unless asked otherwise (see `probes.models.hooks`).
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from probes.models.families import FamilyAdapter, UnsupportedModelError, family_for_architecture, get_family
from probes.models.hooks import PROJECTOR_HOOK, BridgeHooks, HookFn, TorchHooks, lm_hook, vision_hook
from probes.models.processors import load_processor

BACKENDS = ("torch", "bridge")
log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    pass


HASHED_WEIGHTS_MAX_BYTES = 256 * 2**20  # checkpoint files up to this size are identified by content, larger by mtime


def checkpoint_files(folder: Path) -> list[tuple[str, int, str | int]]:
    """(name, size, sha256 of the content or, for files over HASHED_WEIGHTS_MAX_BYTES, the modification time) of
    each weight and JSON file of a checkpoint folder: what identifies its weights. Same shapes give the same sizes,
    so sizes alone miss weights retrained in place; a real checkpoint's multi-GB shards would take minutes to
    hash, so those go by mtime."""
    import hashlib

    files = []
    for f in sorted(f for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".bin", ".json")):
        st = f.stat()
        mark = hashlib.sha256(f.read_bytes()).hexdigest() if st.st_size <= HASHED_WEIGHTS_MAX_BYTES else st.st_mtime_ns
        files.append((f.name, st.st_size, mark))
    return files


def _torchvision_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def boot_bridge(name: str, hf_model: torch.nn.Module, tokenizer: Any, **kw: Any) -> Any:
    """`TransformerBridge.boot_transformers` around an HF model already loaded, without installing anything.

    transformer-lens 4.3's boot loads the model's AutoProcessor, and when that fails (LLaVA-OneVision's needs
    torchvision) it runs `pip install torchvision` into the running environment. On these machines that swaps the
    CPU torch for a CUDA build mid-run (a 2 GB venv becomes 6.6 GB, and later subprocesses import another torch);
    on a cluster it edits a shared environment. Here the boot only asks whether torchvision is importable.
    """
    from transformer_lens.model_bridge import TransformerBridge

    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # another transformer-lens layout: nothing to switch off
        helpers = None
    installer = getattr(helpers, "_ensure_torchvision", None)
    if installer is not None:
        helpers._ensure_torchvision = _torchvision_importable
    try:
        return TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer, **kw)
    finally:
        if installer is not None:
            helpers._ensure_torchvision = installer


def input_device(model: torch.nn.Module) -> torch.device:
    """The device a model's inputs go to. Under a device_map over several devices (or with offloaded modules)
    accelerate's hook on the top module names it (its execution device; it moves the inputs there and the outputs
    back); otherwise the input embeddings' device, or the first parameter not offloaded to "meta"."""
    hook = getattr(model, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # a SequentialHook or one hook
        dev = getattr(h, "execution_device", None)
        if dev is not None and not isinstance(dev, dict):
            return torch.device(dev)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


@dataclass
class LoadedModel:
    name: str
    hf_model: torch.nn.Module
    processor: Any
    adapter: FamilyAdapter
    backend: str = "torch"
    _bridge: Any = field(default=None, repr=False)

    @property
    def family(self) -> str:
        return self.adapter.name

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    @property
    def config(self) -> Any:
        return self.hf_model.config

    @property
    def text_config(self) -> Any:
        return getattr(self.config, "text_config", self.config)

    @property
    def sliding_window(self) -> int | None:
        """The attention window of the LM's sliding-window layers, or None when every layer attends to everything."""
        tc = self.text_config
        window = getattr(tc, "sliding_window", None)
        types = getattr(tc, "layer_types", None)
        if window is None or getattr(tc, "use_sliding_window", True) is False:
            return None
        if types is not None and "sliding_attention" not in types:
            return None
        return int(window)

    @property
    def n_layers(self) -> int:
        return len(self.adapter.lm_layers(self.hf_model))

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device_map(self) -> dict[str, Any] | None:
        """Where accelerate put each module ({module: device, "cpu" or "disk"}), or None for a model on one device."""
        return getattr(self.hf_model, "hf_device_map", None)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device of the model's first module. Not the first parameter's device:
        under a device_map that parameter may be offloaded (on "meta") or on another GPU than the embeddings."""
        return input_device(self.hf_model)

    @property
    def dtype(self) -> torch.dtype:
        """The LM's dtype: that of its input embeddings (on "meta" when offloaded, but of the right dtype); the
        first parameter may be a module kept in float32 (a vision tower's, a norm's)."""
        return self.hf_model.get_input_embeddings().weight.dtype

    @property
    def bridge(self) -> Any:
        """The transformer-lens TransformerBridge around this model (built once, on first use)."""
        if self._bridge is None:
            if len({str(d) for d in (self.device_map or {}).values()}) > 1:
                raise ModelLoadError(f"backend='bridge' cannot wrap a model split by device_map ({self.name}: "
                                     f"{sorted({str(d) for d in self.device_map.values()})}): transformer-lens "
                                     "moves the whole model to one device; use backend='torch'")
            try:
                self._bridge = boot_bridge(self.name, self.hf_model, self.tokenizer, device=str(self.device),
                                           dtype=self.dtype)
            except ImportError as err:  # TL's Qwen2.5-VL adapter needs torchvision (no CPU build here)
                raise ModelLoadError(
                    f"transformer-lens cannot wrap this {self.family} model here ({err}); use backend='torch', "
                    "which serves the capture hooks under the same names"
                ) from err
        return self._bridge

    @property
    def run_key(self) -> dict[str, Any]:
        """What a resumable run's saved parts depend on besides its inputs and settings: the model (its name and,
        for a local folder, `checkpoint_files`, so that weights retrained in place count as another model), the
        dtype, the device and the hook backend."""
        folder = Path(self.name)
        return {"model": self.name, "files": checkpoint_files(folder) if folder.is_dir() else [],
                "dtype": str(self.dtype), "device": str(self.device), "backend": self.backend}

    @property
    def fingerprint(self) -> dict[str, Any]:
        """`model_fingerprint` of this model's folder (what a store records to refuse resuming with other weights)."""
        return model_fingerprint(self.name)

    @cached_property
    def forward_params(self) -> frozenset[str]:
        """Keyword arguments the HF model's forward takes (logits_to_keep, mm_token_type_ids ... vary by family)."""
        import inspect

        return frozenset(inspect.signature(self.hf_model.forward).parameters)

    @cached_property
    def _torch_hooks(self) -> TorchHooks:
        return TorchHooks(self.hf_model, self.adapter)

    @property
    def hook_backend(self) -> TorchHooks | BridgeHooks:
        return BridgeHooks(self.bridge) if self.backend == "bridge" else self._torch_hooks

    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> AbstractContextManager[None]:
        """Context manager: run forwards with `fwd_hooks` = [(tl_hook_name, fn(act, name) -> act | None)]."""
        return self.hook_backend.hooks(fwd_hooks)

    def hook_names(self) -> list[str]:
        return self.hook_backend.names()


DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "organism" / "default"  # the shipped weights (package data)
DEFAULT_NAME = "default"  # `load_model("default")`: the embedded model (probes.organism.DEFAULT_MODEL)

# Config fields that must be non-negative integers when present (top level and in text_config / vision_config): a
# string or a float here fails deep inside the model's __init__ with a traceback that names neither file nor field.
INT_FIELDS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "max_position_embeddings", "head_dim", "image_size", "patch_size", "num_channels",
              "image_token_index", "image_token_id", "image_seq_length", "sliding_window")
SUB_CONFIGS = ("text_config", "vision_config")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """`"default"` -> the embedded model's folder (`DEFAULT_MODEL`); anything else as a string."""
    if str(name_or_path) == DEFAULT_NAME:
        return str(DEFAULT_MODEL)
    return str(name_or_path)


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """config.json of a local checkpoint folder as a dict, checked: valid JSON, an object, `architectures` a list
    of class names, and the size fields (`INT_FIELDS`) non-negative integers; else ModelLoadError naming the file
    and the field."""
    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{folder}: no config.json; expected a Hugging Face model directory")
    try:
        raw = json.loads(cfg.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelLoadError(f"{cfg}: not UTF-8 text (byte {err.start}); expected a JSON object") from None
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{cfg}: not valid JSON ({err.msg}, line {err.lineno}); expected a JSON object") from None
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{cfg}: expected a JSON object of model settings, got {type(raw).__name__}")
    arch = raw.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        raise ModelLoadError(f"{cfg}: field 'architectures' must be a list of class names, got {arch!r}")
    for where, part in [("", raw)] + [(f"{k}.", raw[k]) for k in SUB_CONFIGS if k in raw]:
        if not isinstance(part, dict):
            raise ModelLoadError(f"{cfg}: field {where.rstrip('.')!r} must be an object, got {type(part).__name__}")
        for key in INT_FIELDS:
            value = part.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ModelLoadError(f"{cfg}: field '{where}{key}' must be a non-negative integer, got {value!r}")
    return raw


def check_weight_files(folder: str | os.PathLike) -> None:
    """Open the header of every `*.safetensors` of a checkpoint folder (cheap: no tensor is read), so a truncated or
    garbage file is named here rather than deep inside transformers."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as err:  # SafetensorError derives from Exception only
            raise ModelLoadError(f"{f}: not a readable safetensors file ({err}); expected the checkpoint's weights "
                                 "(truncated or corrupt? copy or save it again)") from None


@dataclass
class ModelInfo:
    """What a model is, read from its config and processor without loading weights (see `inspect_model`)."""

    source: str
    architecture: str
    family: str
    n_layers: int
    n_vision_layers: int | None
    has_projector: bool
    max_positions: int | None  # the LM's max_position_embeddings (None: the config gives no limit)
    config: Any = field(repr=False)
    adapter: FamilyAdapter = field(repr=False)

    def hook_names(self) -> list[str]:
        """The hook names the torch backend serves for this model (as `LoadedModel.hook_names()` with it)."""

        out = [lm_hook(i, k) for i in range(self.n_layers)
               for k in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
        out += [vision_hook(i) for i in range(self.n_vision_layers or 0)]
        return out + ([PROJECTOR_HOOK] if self.has_projector else [])


@dataclass
class _Resolved:
    """Where a model is and what it is, before any weight is read."""

    source: str
    is_local: bool
    kw: dict[str, Any]
    config: Any
    architecture: str
    adapter_cls: type[FamilyAdapter]
    model_cls: Any


def _resolve(name_or_path: str | os.PathLike, family: str | None, trust_remote_code: bool) -> _Resolved:
    import transformers
    from transformers import AutoConfig

    name = resolve_model(name_or_path)
    local = Path(name).expanduser()
    is_local = local.is_dir()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if not is_local and (looks_like_path or local.exists()):
        raise ModelLoadError(f"model path {name} is not a directory; expected a Hugging Face model folder, an HF id "
                             f"or {DEFAULT_NAME!r}")
    source = str(local) if is_local else name
    kw: dict[str, Any] = {"local_files_only": True} if is_local or os.environ.get("HF_HUB_OFFLINE") == "1" else {}
    kw["trust_remote_code"] = trust_remote_code
    where = f"{source}/config.json" if is_local else source
    if is_local:
        raw = read_config(local)
        arch = (raw.get("architectures") or [None])[0]
    try:
        config = AutoConfig.from_pretrained(source, **kw)
    except OSError as err:
        raise ModelLoadError(f"cannot load the config of {source!r} (offline: {bool(kw.get('local_files_only'))}): "
                             f"{' '.join(str(err).split())}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # e.g. an unknown model_type
        raise ModelLoadError(f"{where}: not a config transformers can read ({err})") from None
    if not is_local:
        arch = (getattr(config, "architectures", None) or [None])[0]
    adapter_cls = get_family(family) if family else family_for_architecture(arch, where=source)
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        raise UnsupportedModelError(f"{source}: transformers has no class {arch!r}")
    return _Resolved(source, is_local, kw, config, arch, adapter_cls, model_cls)


def _load_processor(r: _Resolved) -> Any:
    from transformers import AutoTokenizer

    try:
        if r.adapter_cls.placeholder is None:
            return AutoTokenizer.from_pretrained(r.source, **r.kw)
        return load_processor(r.source, **r.kw)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelLoadError(f"cannot load the processor/tokenizer of {r.source!r}: "
                             f"{' '.join(str(err).split())}") from None


def _meta_model(r: _Resolved) -> torch.nn.Module:
    """The architecture with no weights (on the meta device: no memory, no file read): its layers and modules."""
    try:
        with torch.device("meta"):
            return r.model_cls._from_config(r.config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as err:
        where = f"{r.source}/config.json" if r.is_local else r.source
        raise ModelLoadError(f"{where}: cannot build {r.architecture} from this config ({err})") from None


def inspect_model(name_or_path: str | os.PathLike, *, family: str | None = None,
                  trust_remote_code: bool = False) -> ModelInfo:
    """What `load_model` would load, without its weights: the architecture built on the meta device (so layer
    counts and hook names are the real ones), the processor, and the context limit. Errors as `load_model`'s."""
    r = _resolve(name_or_path, family, trust_remote_code)
    processor = _load_processor(r)
    meta = _meta_model(r)
    adapter = r.adapter_cls(processor, meta.config)
    vision = adapter.vision_layers(meta) if adapter.is_multimodal else None
    text = getattr(meta.config, "text_config", meta.config)
    limit = getattr(text, "max_position_embeddings", None)
    return ModelInfo(source=r.source, architecture=r.architecture, family=adapter.name,
                     n_layers=len(adapter.lm_layers(meta)), n_vision_layers=None if vision is None else len(vision),
                     has_projector=bool(adapter.is_multimodal and adapter.projector(meta) is not None),
                     max_positions=int(limit) if isinstance(limit, int) else None, config=meta.config,
                     adapter=adapter)


def model_fingerprint(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a model's weights: its name and, for a local folder, `checkpoint_files` (content of weight
    and JSON files up to HASHED_WEIGHTS_MAX_BYTES, the modification time of larger ones)."""
    folder = Path(resolve_model(name_or_path)).expanduser()
    name = str(folder) if folder.is_dir() else str(name_or_path)
    return {"model": name, "files": [list(f) for f in checkpoint_files(folder)] if folder.is_dir() else []}


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """16 hex digits that change whenever the fingerprint does (what a store records and an error shows)."""
    import hashlib

    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadOptions:
    """How `load_model` loads (see there), checked once here: `dtype` given as a name ("bfloat16") is turned into
    the torch dtype, and a bad backend or dtype name is a ModelLoadError naming it."""

    device: str | torch.device | None = None
    dtype: torch.dtype | str | None = None
    backend: str = "torch"
    family: str | None = None
    device_map: str | dict[str, Any] | None = None
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    allow_partial: bool = False
    max_memory: dict[int | str, int | str] | None = None  # with device_map: bytes ("20GiB") per device, "cpu" too
    offload_folder: str | os.PathLike | None = None  # with device_map: where modules put on "disk" are written

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ModelLoadError(f"backend {self.backend!r}: expected one of {BACKENDS}")
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ModelLoadError("max_memory and offload_folder place the modules of a device_map; pass "
                                 "device_map='auto' (or a dict) with them")
        if isinstance(self.device_map, dict) and "disk" in map(str, self.device_map.values()) \
                and self.offload_folder is None:
            raise ModelLoadError("device_map puts modules on 'disk': pass offload_folder (a folder for their "
                                 "weights)")
        if self.device_map is not None and self.backend == "bridge":
            raise ModelLoadError("backend='bridge' cannot wrap a model split by device_map (transformer-lens moves "
                                 "the whole model to one device); use backend='torch'")
        if isinstance(self.dtype, str):
            if not isinstance(getattr(torch, self.dtype, None), torch.dtype):
                raise ModelLoadError(f"dtype {self.dtype!r}: expected a torch dtype name such as float32 or bfloat16")
            object.__setattr__(self, "dtype", getattr(torch, self.dtype))

    @classmethod
    def of(cls, options: "LoadOptions | None", keywords: dict[str, Any]) -> "LoadOptions":
        """`options` (None: the defaults) with `keywords` replacing its fields; an unknown keyword is a TypeError."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(keywords) - set(known))
        if unknown:
            raise TypeError(f"load_model() got unexpected keyword argument(s) {unknown}; options: {known}")
        return replace(options, **keywords) if options is not None else cls(**keywords)

    def from_pretrained_kw(self, base: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of `from_pretrained`: `base` (where to look) plus dtype, device_map, attention."""
        load_kw = dict(base)
        if self.dtype is not None:
            load_kw["dtype"] = self.dtype
        if self.device_map is not None:
            load_kw["device_map"] = self.device_map
        if self.max_memory is not None:
            load_kw["max_memory"] = self.max_memory
        if self.offload_folder is not None:
            load_kw["offload_folder"] = str(self.offload_folder)
        load_kw["attn_implementation"] = self.attn_implementation or ("eager" if self.backend == "bridge" else "sdpa")
        return load_kw


def load_model(name_or_path: str | os.PathLike, options: LoadOptions | None = None, **kw: Any) -> LoadedModel:
    """Load a supported MLLM (or causal LM) by HF id, local directory or "default" (the embedded model), offline
    for local paths.

    Options (keywords, or a `LoadOptions`, which keywords override): device, dtype (a torch dtype or its name),
    backend ("torch"), family, device_map, attn_implementation, trust_remote_code (False), allow_partial (False),
    max_memory, offload_folder.
    `family` overrides detection from `config.json`'s `architectures`. `backend` is 'torch' (plain forward
    hooks, fast) or 'bridge' (transformer-lens TransformerBridge: every TL hook point). `device_map` ("auto" or
    {module: device}, through accelerate) spreads a model too large for one GPU over the GPUs of a node, with
    `max_memory` ({device: bytes}) capping each and modules that fit nowhere offloaded to the CPU or to "disk"
    (`offload_folder`); `device` is then ignored (inputs go where `LoadedModel.device` says). Needs the torch
    backend. `trust_remote_code` stays off unless asked.

    Weights that do not match the architecture (keys missing from the checkpoint, keys the architecture does not
    have, tensors of another shape) are a ModelLoadError naming the counts: such a model runs, but on random
    weights. `allow_partial=True` loads it anyway, with a warning. A corrupt weight file, a bad config.json or a
    pickled `pytorch_model.bin` that torch refuses are ModelLoadErrors naming the file.
    """
    opts = LoadOptions.of(options, kw)
    r = _resolve(name_or_path, opts.family, opts.trust_remote_code)
    if r.is_local:
        check_weight_files(r.source)
        _meta_model(r)  # a config that cannot build its architecture, named before any weight is read
    hf_model, info = _from_pretrained(r, opts.from_pretrained_kw(r.kw))
    _check_loading_info(r, info, opts.allow_partial)
    hf_model.eval()
    if opts.device is not None and opts.device_map is None:
        hf_model.to(opts.device)
    processor = _load_processor(r)
    adapter = r.adapter_cls(processor, hf_model.config)
    return LoadedModel(name=r.source, hf_model=hf_model, processor=processor, adapter=adapter, backend=opts.backend)


def _from_pretrained(r: _Resolved, load_kw: dict[str, Any]) -> tuple[torch.nn.Module, dict]:
    """The HF model and transformers' loading info, with transformers' own load report (a table of every key,
    dozens of lines) silenced: `_check_loading_info` says what matters in one line."""
    import pickle
    import warnings

    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # Other-shape tensors are let through here and counted in the loading info, so that one message
            # gives every count (refused or, with allow_partial, warned about by _check_loading_info).
            return r.model_cls.from_pretrained(r.source, output_loading_info=True, ignore_mismatched_sizes=True,
                                               **load_kw)
    except pickle.UnpicklingError as err:
        bins = ", ".join(f.name for f in sorted(Path(r.source).glob("*.bin"))) if r.is_local else "its .bin weights"
        first = str(err).split(".")[0]
        raise ModelLoadError(f"{r.source}: torch refused to unpickle {bins} ({first}): it holds more than plain "
                             "tensors and is not loaded (it could run code); expected model.safetensors") from None
    except OSError as err:
        raise ModelLoadError(f"cannot load weights of {r.source!r}: {' '.join(str(err).split())}") from None
    except RuntimeError as err:
        if "mismatch" in str(err):  # a mismatch transformers refuses even with ignore_mismatched_sizes
            raise ModelLoadError(f"{r.source}: weights do not match {r.architecture}: tensors of another shape "
                                 "than the config says; pass allow_partial=True (--allow-partial) to load the "
                                 "rest anyway") from None
        raise
    except Exception as err:
        if type(err).__name__ == "SafetensorError":  # a file check_weight_files did not see (a hub snapshot)
            raise ModelLoadError(f"{r.source}: a safetensors weight file is unreadable ({err})") from None
        raise
    finally:
        hf_logging.set_verbosity(level)


def _check_loading_info(r: _Resolved, info: dict, allow_partial: bool) -> None:
    """Refuse (or, with allow_partial, warn about) weights that do not fill the architecture."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    files = [f.name for f in sorted(Path(r.source).iterdir()) if f.suffix in (".safetensors", ".bin")] \
        if r.is_local else []
    example = (missing or unexpected or mismatched)[0]
    what = (f"{r.source}{' (' + ', '.join(files) + ')' if files else ''}: weights do not match {r.architecture}: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} of another shape "
            f"(e.g. {example!r})")
    if not allow_partial:
        raise ModelLoadError(f"{what}; those would be random. Pass allow_partial=True (--allow-partial) "
                             "to load it anyway")
    log.warning("%s; loaded anyway (allow_partial): those are random", what)
