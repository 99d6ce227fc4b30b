"""What every MLLM family adapter knows: image placeholder, image-token layout on the vision grid, module paths.

An adapter is deliberately small. The chat template itself is *not* re-implemented here: rendering uses the
checkpoint's own template (`probes.render`), so a real checkpoint renders exactly as its processor would. What
differs between families and is not in the template lives here:

- `placeholder`: the text the chat template emits for one image, which the processor expands into image tokens;
- `patch_layout`: for each token of that expansion, its tile (0 = the whole image / global view, 1.. = crops) and
  patch (row, col) on that tile's token grid, or -1 for wrapper, separator and newline tokens;
- `image_inputs`: the pixel tensors (and grid sizes) the model's forward takes for a list of images;
- `position_ids` / `forward_extras`: anything the forward needs to agree between one pass and a chunked pass
  through the KV cache (Qwen's 3-D rotary positions, Gemma 3's image token types);
- module paths of the language layers, vision layers and projector, for the plain-PyTorch hook backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Int
from PIL import Image
from torch import Tensor


class RenderError(ValueError):
    """A session cannot be rendered for this model (wrong image count, images for a text-only model ...)."""


@dataclass
class ImageExpansion:
    """The tokens one image placeholder becomes, with each token's place on the vision grid."""

    token_ids: list[int]
    tile: np.ndarray  # [n] 0 = global/base view, 1.. = crops, -1 = not a patch token
    patch_row: np.ndarray  # [n] row on the tile's token grid, -1 if not a patch token
    patch_col: np.ndarray  # [n]
    grid: dict[int, tuple[int, int]]  # tile -> (rows, cols) of its token grid

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("tile", "patch_row", "patch_col"):
            arr = np.asarray(getattr(self, name), dtype=np.int64)
            if arr.shape != (n,):
                raise ValueError(f"ImageExpansion.{name} has shape {arr.shape}, expected ({n},)")
            setattr(self, name, arr)


def grid_layout(rows: int, cols: int, tile: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tile, row, col) of a row-major `rows x cols` grid of patch tokens."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return np.full(rows * cols, tile), r, c


def not_patches(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.full(n, -1), np.full(n, -1), np.full(n, -1)


class FamilyAdapter:
    """Base class; subclasses set the class attributes and override `patch_layout`."""

    name: ClassVar[str]  # the family's key in probes.families.FAMILIES
    # The string the chat template emits per image, expanded by the processor (None: a text-only model).
    placeholder: ClassVar[str | None] = "<image>"
    # Dotted module paths inside the HF model, for the plain-PyTorch hook backend.
    lm_layers_path: ClassVar[str] = "model.language_model.layers"
    vision_layers_path: ClassVar[str | None] = "model.vision_tower.encoder.layers"
    projector_path: ClassVar[str | None] = "model.multi_modal_projector"
    attn_name: ClassVar[str] = "self_attn"
    mlp_name: ClassVar[str] = "mlp"

    def __init__(self, processor: Any, hf_config: Any) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.hf_config = hf_config
        self._expansions: dict[int, ImageExpansion] = {}

    # ---- images -------------------------------------------------------------------------------------------
    @property
    def architectures(self) -> tuple[str, ...]:
        from probes.families import FAMILIES

        return FAMILIES[self.name]

    @property
    def is_multimodal(self) -> bool:
        return self.placeholder is not None

    @property
    def placeholder_id(self) -> int:
        ids = self.tokenizer.convert_tokens_to_ids([self.placeholder])
        if ids[0] is None or ids[0] == self.tokenizer.unk_token_id:
            raise RenderError(f"{self.name}: tokenizer has no token {self.placeholder!r}")
        return int(ids[0])

    def process(self, images: list[Image.Image]) -> dict[str, Any]:
        """Run the processor on `images` with one placeholder each (no BOS/EOS added)."""
        return self.processor(
            text=[self.placeholder * len(images)],
            images=[images] if self.nested_images else images,
            add_special_tokens=False,
            return_tensors="pt",
        )

    # Idefics3-style processors want images nested per text sample.
    nested_images: ClassVar[bool] = False

    def expand_image(self, image: Image.Image) -> ImageExpansion:
        """The expansion of one placeholder for `image` (cached by image size: layout depends on size only)."""
        key = hash(image.size)
        if key not in self._expansions:
            out = self.process([image])
            ids = out["input_ids"][0].tolist()
            tile, row, col, grid = self.patch_layout(ids, out)
            self._expansions[key] = ImageExpansion(ids, tile, row, col, grid)
        return self._expansions[key]

    def expansion_text(self, expansion: ImageExpansion) -> str:
        """The text the processor puts in place of one placeholder (its token ids, decoded verbatim)."""
        return self.tokenizer.decode(expansion.token_ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def image_inputs(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """Model-forward keyword tensors for `images` (pixel_values and whatever grid sizes the family needs)."""
        if not images:
            return {}
        out = self.process(images)
        return {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")}

    def patch_layout(
        self, ids: list[int], processed: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[int, int]]]:
        raise NotImplementedError(f"{type(self).__name__} must define patch_layout")

    def image_token_mask(self, input_ids: Int[Tensor, "batch pos"]) -> torch.Tensor:
        """Positions the model fills with image features (for checks and for noise corruptions)."""
        return input_ids == int(self.hf_config.image_token_id)

    # ---- forward --------------------------------------------------------------------------------------------
    # True when position_ids needs the image inputs of the whole session (Qwen's M-RoPE reads the image grids).
    positions_need_images: ClassVar[bool] = False

    def position_ids(self, model: Any, input_ids: Tensor, image_inputs: dict[str, Tensor]) -> Tensor | None:
        """Position ids of the whole sequence when the family's positions are not just 0..L-1, else None."""
        return None

    def forward_extras(self, input_ids: Tensor, start: int, end: int) -> dict[str, Tensor]:
        """Extra forward kwargs for the chunk [start, end) of `input_ids` (whole-sequence ids)."""
        return {}

    # ---- modules, for the torch hook backend ---------------------------------------------------------------
    def lm_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList:
        return _get(model, self.lm_layers_path)

    def vision_layers(self, model: torch.nn.Module) -> torch.nn.ModuleList | None:
        return _get(model, self.vision_layers_path) if self.vision_layers_path else None

    def projector(self, model: torch.nn.Module) -> torch.nn.Module | None:
        return _get(model, self.projector_path) if self.projector_path else None

    def stop_token_ids(self) -> set[int]:
        """Token ids that end an assistant turn during generation."""
        ids = set()
        for tok in (self.tokenizer.eos_token, *self.end_of_turn_tokens):
            if tok is not None:
                i = self.tokenizer.convert_tokens_to_ids(tok)
                if i is not None and i != self.tokenizer.unk_token_id:
                    ids.add(int(i))
        eos = getattr(getattr(self.hf_config, "text_config", self.hf_config), "eos_token_id", None)
        for i in eos if isinstance(eos, list) else [eos]:
            if i is not None:
                ids.add(int(i))
        return ids

    end_of_turn_tokens: ClassVar[tuple[str, ...]] = ()


def _get(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
