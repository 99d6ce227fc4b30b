"""Hooks under transformer-lens names, on either backend.

- `bridge`: transformer-lens' TransformerBridge wraps the HF model in place; every TL hook point exists
  (attention patterns, q/k/v ...). Its per-module Python wrappers cost ~50% extra time on tiny models.
- `torch`: plain PyTorch forward hooks on the HF modules, registered under the same TL names for the hooks the
  capture needs. Nearly free, and works for models the bridge cannot wrap.

Both call `fn(activation, name)`; a hook that returns a tensor replaces the activation (used by patching).

Under a device_map (layers on several devices, or offloaded and streamed in by accelerate) a hook sees the
tensor where the model has it: `hook_resid_pre` on the device of the layer before (accelerate moves it into the
layer after the hook), the others on their layer's execution device; never on "meta". A returned tensor is put
back on the activation's device and dtype (`like`), so a patch made elsewhere, or upcast to float32 for
arithmetic, does not move the rest of the forward to another device or dtype.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from probes.models.families.base import FamilyAdapter

HookFn = Callable[[Tensor, str], "Tensor | None"]

# TL hook name patterns served by the torch backend -> (module kind, which tensor)
_LAYER_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out)$")
_VISION_HOOK = re.compile(r"^vision_encoder\.encoder_layers\.(\d+)\.hook_out$")
PROJECTOR_HOOK = "vision_projector.hook_out"


class HookNameError(ValueError):
    pass


def lm_hook(layer: int, kind: str = "hook_resid_post") -> str:
    return f"blocks.{layer}.{kind}"


def vision_hook(layer: int) -> str:
    return f"vision_encoder.encoder_layers.{layer}.hook_out"


def split_hook(name: str) -> tuple[str, int]:
    """'blocks.3.hook_resid_post' -> ('hook_resid_post', 3); 'vision_encoder.encoder_layers.1.hook_out' ->
    ('vision.hook_out', 1); anything else -> (name, 0)."""
    m = _LAYER_HOOK.match(name) or re.match(r"^blocks\.(\d+)\.(.+)$", name)
    if m:
        return m.group(2), int(m.group(1))
    m = _VISION_HOOK.match(name)
    if m:
        return "vision.hook_out", int(m.group(1))
    return name, 0


def like(new: Tensor, old: Tensor) -> Tensor:
    """`new` on `old`'s device and in its dtype (itself when it already is)."""
    return new if (new.device, new.dtype) == (old.device, old.dtype) else new.to(old.device, old.dtype)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _replace_first(out: Any, new: Tensor) -> Any:
    if isinstance(out, tuple):
        return (new, *out[1:])
    if isinstance(out, list):
        return [new, *out[1:]]
    return new


class TorchHooks:
    """Forward hooks on HF modules, addressed by TL hook names (see module docstring)."""

    def __init__(self, model: torch.nn.Module, adapter: FamilyAdapter) -> None:
        self.model = model
        self.adapter = adapter

    def names(self) -> list[str]:
        n_layers = len(self.adapter.lm_layers(self.model))
        out = [lm_hook(i, k) for i in range(n_layers)
               for k in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out")]
        vision = self.adapter.vision_layers(self.model) if self.adapter.is_multimodal else None
        if vision is not None:
            out += [vision_hook(i) for i in range(len(vision))]
        if self.adapter.is_multimodal and self.adapter.projector(self.model) is not None:
            out.append(PROJECTOR_HOOK)
        return out

    def _register(self, name: str, fn: HookFn) -> Any:
        m = _LAYER_HOOK.match(name)
        if m:
            layers = self.adapter.lm_layers(self.model)
            i, kind = int(m.group(1)), m.group(2)
            if i >= len(layers):
                raise HookNameError(f"hook {name!r}: the model has {len(layers)} layers")
            layer = layers[i]
            if kind == "hook_resid_pre":
                def pre(mod, args, kwargs):
                    x = args[0] if args else kwargs["hidden_states"]
                    new = fn(x, name)
                    if new is None:
                        return None
                    new = like(new, x)
                    if args:
                        return (new, *args[1:]), kwargs
                    return args, {**kwargs, "hidden_states": new}
                return layer.register_forward_pre_hook(pre, with_kwargs=True)
            module = {"hook_resid_post": layer, "hook_attn_out": getattr(layer, self.adapter.attn_name),
                      "hook_mlp_out": getattr(layer, self.adapter.mlp_name)}[kind]
            return module.register_forward_hook(_post(fn, name))
        m = _VISION_HOOK.match(name)
        if m:
            layers = self.adapter.vision_layers(self.model)
            i = int(m.group(1))
            if layers is None or i >= len(layers):
                raise HookNameError(f"hook {name!r}: no such vision layer")
            return layers[i].register_forward_hook(_post(fn, name))
        if name == PROJECTOR_HOOK and self.adapter.projector(self.model) is not None:
            return self.adapter.projector(self.model).register_forward_hook(_post(fn, name))
        raise HookNameError(
            f"hook {name!r} is not served by the torch backend (it serves blocks.<i>.hook_resid_pre/_post, "
            f"hook_attn_out, hook_mlp_out, vision_encoder.encoder_layers.<i>.hook_out, {PROJECTOR_HOOK}); "
            "load the model with backend='bridge' for every transformer-lens hook"
        )

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        handles = []
        try:
            for name, fn in fwd_hooks:
                handles.append(self._register(name, fn))
            yield
        finally:
            for h in handles:
                h.remove()


def _post(fn: HookFn, name: str):
    def hook(mod, args, out):
        x = _first(out)
        new = fn(x, name)
        return None if new is None else _replace_first(out, like(new, x))
    return hook


class BridgeHooks:
    """The same interface on a transformer-lens TransformerBridge (every TL hook point)."""

    def __init__(self, bridge: Any) -> None:
        self.bridge = bridge

    def names(self) -> list[str]:
        return list(self.bridge.hook_dict.keys())

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
        known = self.bridge.hook_dict
        for name, _ in fwd_hooks:
            if name not in known:
                raise HookNameError(f"hook {name!r} is not a hook point of this bridge")
        wrapped = [(name, (lambda f, n: lambda x, hook: _like_or_none(f(x, n), x))(fn, name)) for name, fn in fwd_hooks]
        with self.bridge.hooks(fwd_hooks=wrapped):
            yield


def _like_or_none(new: Tensor | None, old: Tensor) -> Tensor | None:
    return None if new is None else like(new, old)
