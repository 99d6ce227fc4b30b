"""Load any supported MLLM offline: one call, an HF id or a local directory -> `LoadedModel`.

A `LoadedModel` holds the HF model, its processor/tokenizer, the family adapter, and a hook backend under
transformer-lens names. The TransformerBridge is built on first use of `.bridge` (it rewraps the HF model in
place); capture uses the lighter torch backend unless asked otherwise (see `probes.hooks`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from probes.families import FamilyAdapter, UnsupportedModelError, family_for_architecture, get_family
from probes.hooks import BridgeHooks, TorchHooks
from probes.processors import load_processor

BACKENDS = ("torch", "bridge")


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
    def n_layers(self) -> int:
        return len(self.adapter.lm_layers(self.hf_model))

    @property
    def d_model(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def bridge(self) -> Any:
        """The transformer-lens TransformerBridge around this model (built once, on first use)."""
        if self._bridge is None:
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

    def hooks(self, fwd_hooks: list) -> Any:
        """Context manager: run forwards with `fwd_hooks` = [(tl_hook_name, fn(act, name) -> act | None)]."""
        return self.hook_backend.hooks(fwd_hooks)

    def hook_names(self) -> list[str]:
        return self.hook_backend.names()


def _read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise ModelLoadError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as err:
        raise ModelLoadError(f"{cfg}: not valid JSON ({err.msg})") from err


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str = "torch",
    family: str | None = None,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a supported MLLM (or causal LM) by HF id or local directory, offline for local paths.

    `family` overrides detection from `config.json`'s `architectures`. `backend` is 'torch' (plain forward
    hooks, fast) or 'bridge' (transformer-lens TransformerBridge: every TL hook point). `device_map` spreads a
    large model over the GPUs of a node. `trust_remote_code` stays off unless asked.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    if backend not in BACKENDS:
        raise ModelLoadError(f"backend {backend!r}: expected one of {BACKENDS}")
    local = Path(name_or_path).expanduser()
    is_local = local.is_dir()
    looks_like_path = str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1
    if not is_local and looks_like_path:
        raise ModelLoadError(f"model path {name_or_path} is not a directory")
    source = str(local) if is_local else str(name_or_path)
    kw: dict[str, Any] = {"local_files_only": True} if is_local or os.environ.get("HF_HUB_OFFLINE") == "1" else {}
    kw["trust_remote_code"] = trust_remote_code
    if is_local:
        raw = _read_config(local)
        arch = (raw.get("architectures") or [None])[0]
    else:
        try:
            config = AutoConfig.from_pretrained(source, **kw)
        except OSError as err:
            raise ModelLoadError(f"cannot load the config of {source!r} (offline: {bool(kw.get('local_files_only'))}): "
                                 f"{err}") from err
        arch = (getattr(config, "architectures", None) or [None])[0]
    adapter_cls = get_family(family) if family else family_for_architecture(arch, where=source)
    model_cls = getattr(transformers, arch, None) if arch else None
    if model_cls is None:
        raise UnsupportedModelError(f"{source}: transformers has no class {arch!r}")

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    load_kw: dict[str, Any] = dict(kw)
    if dtype is not None:
        load_kw["dtype"] = dtype
    if device_map is not None:
        load_kw["device_map"] = device_map
    load_kw["attn_implementation"] = attn_implementation or ("eager" if backend == "bridge" else "sdpa")
    try:
        hf_model = model_cls.from_pretrained(source, **load_kw)
    except OSError as err:
        raise ModelLoadError(f"cannot load weights of {source!r}: {err}") from err
    hf_model.eval()
    if device is not None and device_map is None:
        hf_model.to(device)
    try:
        if adapter_cls.placeholder is None:
            processor = AutoTokenizer.from_pretrained(source, **kw)
        else:
            processor = load_processor(source, **kw)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the processor/tokenizer of {source!r}: {err}") from err
    adapter = adapter_cls(processor, hf_model.config)
    return LoadedModel(name=source, hf_model=hf_model, processor=processor, adapter=adapter, backend=backend)
