"""What every MLLM family adapter knows: image placeholder, image-token layout on the vision grid, module paths.

An adapter is deliberately small. The chat template itself is *not* re-implemented here: rendering uses the
checkpoint's own template (`probes.models.render`), so a real checkpoint renders exactly as its processor would. What
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

import functools
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from PIL import Image
from torch import Tensor

from probes.models.families.registry import FAMILIES


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


# ---- where each image token looks: token boxes in original image pixels ------------------------------------------
# Coordinates are continuous: pixel (i, j) of an image covers [j, j+1) x [i, i+1). A token's box is the region of
# the original image that the processor's resize / crop / pad / tiling maps onto the token's pixels (resampling
# kernels reach a pixel or so beyond it); the part of a token that shows only padding is clipped off, so a token
# that sees nothing but padding has an empty box (x0 == x1 or y0 == y1).
BOX_COLUMNS = ["tile", "patch_row", "patch_col", "x0", "y0", "x1", "y1"]


@dataclass(frozen=True)
class View:
    """An axis-aligned affine map from original pixels to a processed tile's pixels: tile = orig * s + o."""

    sx: float | int = 1.0
    sy: float | int = 1.0
    ox: float | int = 0.0
    oy: float | int = 0.0

    def then(self, sx: float | int = 1.0, sy: float | int = 1.0, ox: float | int = 0.0, oy: float | int = 0.0
             ) -> "View":
        """This map followed by `tile = x * s + o`."""
        return View(self.sx * sx, self.sy * sy, self.ox * sx + ox, self.oy * sy + oy)

    def cells(self, row: np.ndarray, col: np.ndarray, cell_h: float | int, cell_w: float | int) -> np.ndarray:
        """[n, 4] original-pixel boxes (x0, y0, x1, y1) of grid cells (row, col) of `cell_h x cell_w` tile px."""
        row, col = np.asarray(row, dtype=float), np.asarray(col, dtype=float)
        return self.back(col * cell_w, row * cell_h, (col + 1) * cell_w, (row + 1) * cell_h)

    def back(self, x0, y0, x1, y1) -> np.ndarray:
        """Tile-pixel boxes mapped back to original pixels, [n, 4]."""
        return np.stack([(np.asarray(x0, float) - self.ox) / self.sx, (np.asarray(y0, float) - self.oy) / self.sy,
                         (np.asarray(x1, float) - self.ox) / self.sx, (np.asarray(y1, float) - self.oy) / self.sy], 1)


def resize_hw(size: Any, h: int, w: int) -> tuple[int, int]:
    """The (height, width) transformers' `TorchvisionBackend.resize` gives an h x w image for `size`."""
    from transformers.image_transforms import get_resize_output_image_size, get_size_with_aspect_ratio
    from transformers.image_utils import get_image_size_for_max_height_width

    if size.shortest_edge and size.longest_edge:
        return tuple(get_size_with_aspect_ratio((h, w), size.shortest_edge, size.longest_edge))
    if size.shortest_edge:
        dummy = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (3, h, w))  # only its shape is read
        return tuple(get_resize_output_image_size(dummy, size.shortest_edge, default_to_square=False,
                                                  input_data_format="channels_first"))
    if size.max_height and size.max_width:
        return tuple(get_image_size_for_max_height_width((h, w), size.max_height, size.max_width))
    if size.height and size.width:
        return int(size.height), int(size.width)
    raise ValueError(f"image processor size {size} has no rule this toolkit knows")


def clip_view(ip: Any, h: int, w: int, view: View = View(), pad_square: bool = False) -> tuple[View, int, int]:
    """CLIP-style preprocessing of an h x w image: [pad to square], resize by `ip.size`, centre crop.

    Returns the composed view and the output (height, width); the arithmetic is the processor's own.
    """
    if pad_square and h != w:  # LlavaImageProcessor(do_pad=True): centred, before resizing
        side = max(h, w)
        view, h, w = view.then(ox=(side - w) // 2, oy=(side - h) // 2), side, side
    if ip.do_resize:
        nh, nw = resize_hw(ip.size, h, w)
        view, h, w = view.then(sx=nw / w, sy=nh / h), nh, nw
    if getattr(ip, "do_center_crop", False) and ip.crop_size is not None and ip.crop_size.height:
        ch, cw = int(ip.crop_size.height), int(ip.crop_size.width)
        if cw > w or ch > h:  # centre_crop pads first (left/top get the smaller half)
            pl, pt = ((cw - w) // 2 if cw > w else 0), ((ch - h) // 2 if ch > h else 0)
            view, h, w = view.then(ox=pl, oy=pt), max(h, ch), max(w, cw)
        top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
        view, h, w = view.then(ox=-left, oy=-top), ch, cw
    return view, h, w


def boxes_frame(tile: np.ndarray, row: np.ndarray, col: np.ndarray, boxes: np.ndarray,
                image_size: tuple[int, int]) -> pd.DataFrame:
    """The token-box table, boxes clipped to the image (a token that sees only padding gets an empty box)."""
    W, H = image_size
    b = np.asarray(boxes, dtype=float).reshape(-1, 4)
    x0, x1 = np.clip(b[:, 0], 0, W), np.clip(b[:, 2], 0, W)
    y0, y1 = np.clip(b[:, 1], 0, H), np.clip(b[:, 3], 0, H)
    return pd.DataFrame({"tile": np.asarray(tile, np.int64), "patch_row": np.asarray(row, np.int64),
                         "patch_col": np.asarray(col, np.int64), "x0": x0, "y0": y0,
                         "x1": np.maximum(x0, x1), "y1": np.maximum(y0, y1)}, columns=BOX_COLUMNS)


def cached_boxes(fn: Callable[[Any, tuple[int, int]], pd.DataFrame]) -> Callable[[Any, tuple[int, int]], pd.DataFrame]:
    """Cache an adapter's `token_boxes` by image size (they depend on nothing else); callers get a copy."""

    @functools.wraps(fn)
    def wrapper(self: Any, image_size: tuple[int, int]) -> pd.DataFrame:
        key = (int(image_size[0]), int(image_size[1]))
        cache = self.__dict__.setdefault("_token_boxes", {})
        if key not in cache:
            cache[key] = fn(self, key)
        return cache[key].copy()

    return wrapper


class FamilyAdapter:
    """Base class; subclasses set the class attributes and override `patch_layout`.

    An adapter caches image expansions and patch boxes by image size, so it reads its processor's settings
    (image splitting, pan and scan, sizes) as they were when first used: after changing them, build a new adapter
    (`Adapter(processor, config)`), as the tests do."""

    name: ClassVar[str]  # the family's key in registry.FAMILIES
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

    def process(self, images: list[Image.Image]) -> Mapping[str, Any]:
        """Run the processor on `images` with one placeholder each (no BOS/EOS added): its output, a
        `transformers.BatchFeature` (a mapping of name -> tensor)."""
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
        return _pixel_inputs(self.process(images))

    def batch_image_inputs(self, per_sample: list[list[Image.Image]]) -> dict[str, Tensor]:
        """Image inputs for a batch of sequences, `per_sample[i]` the images of sequence i, in order."""
        if not self.nested_images:  # the model takes every image of the batch as one flat list
            return self.image_inputs([im for ims in per_sample for im in ims])
        with_images = [ims for ims in per_sample if ims]
        if not with_images:
            return {}
        # padding=True: rows with different numbers of tiles (Idefics3 images of different sizes) pad to the longest
        return _pixel_inputs(self.processor(text=[self.placeholder * len(ims) for ims in with_images],
                                            images=with_images, add_special_tokens=False, padding=True,
                                            return_tensors="pt"))

    def patch_layout(
        self, ids: list[int], processed: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[int, int]]]:
        raise NotImplementedError(f"{type(self).__name__} must define patch_layout")

    def token_boxes(self, image_size: tuple[int, int]) -> pd.DataFrame:
        """For each patch token of one (width, height) image, in expansion order, the box (x0, y0, x1, y1) of
        original pixels it sees (columns `BOX_COLUMNS`; tile/patch_row/patch_col as in `patch_layout`)."""
        raise NotImplementedError(f"{type(self).__name__} does not define token_boxes")

    def _patch_tokens(self, image_size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tile, row, col) of the patch tokens of an image of this (width, height), in expansion order."""
        exp = self.expand_image(Image.new("RGB", (int(image_size[0]), int(image_size[1]))))
        keep = exp.tile >= 0
        return exp.tile[keep], exp.patch_row[keep], exp.patch_col[keep]

    def image_token_mask(self, input_ids: Int[Tensor, "batch pos"]) -> torch.Tensor:  # noqa: F722
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


def _pixel_inputs(processed: Mapping[str, Any]) -> dict[str, Tensor]:
    """The processor output minus the text side (ids and masks come from our own rendering)."""
    return {k: v for k, v in processed.items()
            if k not in ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")}


def _get(root: Any, dotted: str) -> Any:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
