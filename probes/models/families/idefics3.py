"""Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`, e.g. HuggingFaceTB/SmolVLM-Instruct, SmolVLM-256M-Instruct).

The chat template emits one `<image>` per image; the processor expands it. With image splitting, the image is
resized (longest edge `size`), then to multiples of the tile size `max_image_size`, cut into `rows x cols`
square crops, and followed by the whole image resized to one tile (the global view):

    for each crop row i, col j:  <fake_token_around_image><row_i_col_j><image>*seq_len   then "\n" after each row
    "\n"<fake_token_around_image><global-img><image>*seq_len<fake_token_around_image>

An image that fits in one tile is just the global block. `pixel_values` is [batch, n_tiles, 3, tile, tile] in the
same order as the text (crops row-major, global last). Each tile is encoded by the SigLIP tower on its own, and
the connector pixel-shuffles its (tile/patch)^2 patch grid by `scale_factor`, so a tile gives
seq_len = ((tile/patch)/scale_factor)^2 tokens, in row-major order on a (tile/patch/scale) square grid: token
r*side + c gathers the scale x scale block of patches whose top-left patch is (r*scale, c*scale).

Our layout: tile 0 = the global view, tiles 1..rows*cols = crop (i, j) as 1 + i*cols + j (row-major);
`<fake_token_around_image>`, `<row_i_col_j>`, `<global-img>` and newlines are -1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.models.families.base import FamilyAdapter, View, boxes_frame, cached_boxes
from probes.models.tiny import TinySizes, build_tokenizer, save_tiny

# The chat template of HuggingFaceTB/SmolVLM-Instruct (also SmolVLM-256M/500M-Instruct). It writes the start token
# `<|im_start|>` itself; the tokenizer adds no BOS.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

GLOBAL_TAG = "<global-img>"
FAKE = "<fake_token_around_image>"
ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]  # the processor knows up to 6x6


class Adapter(FamilyAdapter):
    name = "idefics3"
    placeholder = "<image>"
    nested_images = True  # the processor wants images nested per text sample
    lm_layers_path = "model.text_model.layers"
    vision_layers_path = "model.vision_model.encoder.layers"
    projector_path = "model.connector"  # pixel shuffle + linear projection
    end_of_turn_tokens = ("<end_of_utterance>",)

    @property
    def tile_side(self) -> int:
        """Side of one tile's token grid after pixel shuffle."""
        v = self.hf_config.vision_config
        return v.image_size // v.patch_size // self.hf_config.scale_factor

    def patch_layout(self, ids, processed):
        tok = self.tokenizer
        image_id = self.placeholder_id
        global_id = tok.convert_tokens_to_ids(GLOBAL_TAG)
        crop_of = {tok.convert_tokens_to_ids(t): divmod(k, 6) for k, t in enumerate(ROW_COL)}
        n_cols = 1 + max((crop_of[t][1] for t in ids if t in crop_of), default=-1)
        side = self.tile_side
        n = len(ids)
        tile, row, col = np.full(n, -1), np.full(n, -1), np.full(n, -1)
        counts: dict[int, int] = {}
        current = None  # the tile whose patch tokens follow the last tag
        for q, t in enumerate(ids):
            if t == global_id:
                current = 0
            elif t in crop_of:
                i, j = crop_of[t]
                current = 1 + i * n_cols + j
            elif t == image_id:
                if current is None:  # e.g. a crop grid past 6x6: its <row_7_col_1> tag is not one token
                    raise ValueError(f"idefics3: an <image> token at {q} follows no tile tag (the processor "
                                     "tags crops up to 6x6; is size.longest_edge over 6 x max_image_size?)")
                k = counts.get(current, 0)
                tile[q], (row[q], col[q]) = current, divmod(k, side)
                counts[current] = k + 1
            else:
                current = None
        n_tiles = processed["pixel_values"].shape[1]
        if len(counts) != n_tiles or any(c != side * side for c in counts.values()):
            raise ValueError(f"idefics3: token counts per tile {counts} do not match {n_tiles} tiles of "
                             f"{side}x{side} tokens")
        return tile, row, col, {k: (side, side) for k in counts}

    @cached_boxes
    def token_boxes(self, image_size):
        """Resize (longest edge `size`), then up to multiples of the tile side T, cut into T x T crops; the global
        view is that image resized to T x T. A token pools a `scale x scale` block of patches of its tile."""
        import math

        # the PIL module: the default (torchvision) module cannot be imported without torchvision
        from transformers.models.idefics3.image_processing_pil_idefics3 import get_resize_output_image_size

        W, H = image_size
        tile, r, c = self._patch_tokens(image_size)
        ip = self.processor.image_processor
        T = int(ip.max_image_size["longest_edge"])
        h, w = H, W
        if ip.do_resize:
            longest = getattr(ip.size, "longest_edge", None)
            if longest is None:  # a fixed {height, width} resize: the crops below would be computed wrongly
                raise ValueError(f"idefics3: image_processor.size {ip.size}: patch boxes need a longest_edge resize")
            h, w = get_resize_output_image_size(torch.empty(0, H, W), resolution_max_side=longest)
        if ip.do_image_splitting:  # resize_for_vision_encoder, verbatim arithmetic
            aspect = w / h
            if w >= h:
                w = math.ceil(w / T) * T
                h = math.ceil(int(w / aspect) / T) * T
            else:
                h = math.ceil(h / T) * T
                w = math.ceil(int(h * aspect) / T) * T
        split = ip.do_image_splitting and (h > T or w > T)
        whole = View(sx=w / W, sy=h / H)  # original -> the resized image the crops are cut from
        views = {0: View(sx=T / W, sy=T / H) if split or not ip.do_image_splitting else whole}
        if split:
            cols = w // T
            for k in range((h // T) * cols):
                views[1 + k] = whole.then(ox=-(k % cols) * T, oy=-(k // cols) * T)
        cell = self.hf_config.vision_config.patch_size * self.hf_config.scale_factor
        boxes = np.zeros((len(tile), 4))
        for t in np.unique(tile):
            m = tile == t
            boxes[m] = views[int(t)].cells(r[m], c[m], cell, cell)
        return boxes_frame(tile, r, c, boxes, image_size)


@dataclass(frozen=True)
class TinyConfig(TinySizes):
    """A tiny SmolVLM: `tile_size` px tiles of `patch_size` px patches, pixel-shuffled by `scale_factor`; images
    resized to a longest edge of `longest_edge` (at most 6 tiles a side: the processor tags crops up to 6x6)."""

    tile_size: int = 64
    longest_edge: int = 128
    patch_size: int = 8
    scale_factor: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        grid = self.tile_size // self.patch_size
        if self.tile_size % self.patch_size or grid % self.scale_factor:
            raise ValueError(f"TinyConfig: tile_size {self.tile_size} must be a multiple of patch_size "
                             f"{self.patch_size}, and its {grid}x{grid} patch grid of scale_factor {self.scale_factor}")
        if self.longest_edge > 6 * self.tile_size:
            raise ValueError(f"TinyConfig: longest_edge {self.longest_edge}: at most 6 x tile_size "
                             f"({6 * self.tile_size})")


def build_tiny(path: str | os.PathLike, config: TinyConfig | None = None, **sizes: Any) -> Path:
    """A tiny SmolVLM: 64-px tiles of 8-px patches, 2x pixel shuffle -> 16 tokens per tile; images are resized to
    a longest edge of 128, so a 2:1 image becomes 1x2 crops + the global view (48 image tokens). Other sizes:
    `config`, or its fields as keywords (`TinyConfig`)."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    c = TinyConfig.of(config, sizes)

    # SmolVLM's tokenizer: BOS `<|im_start|>` (written by the template), EOS `<end_of_utterance>`, pad `<|im_end|>`.
    tok = build_tokenizer([FAKE, "<image>", "<end_of_utterance>", GLOBAL_TAG, *ROW_COL], bos="<|im_start|>",
                          eos="<end_of_utterance>", pad="<|im_end|>", add_bos=False)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": c.longest_edge}, max_image_size={"longest_edge": c.tile_size}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    seq_len = (c.tile_size // c.patch_size // c.scale_factor) ** 2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                                  chat_template=CHAT_TEMPLATE)
    tok = processor.tokenizer
    hf_config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=c.d_vision, intermediate_size=2 * c.d_vision, num_hidden_layers=c.vision_layers,
            num_attention_heads=c.n_heads, image_size=c.tile_size, patch_size=c.patch_size,
        ),
        text_config=LlamaConfig(
            hidden_size=c.d_model, intermediate_size=2 * c.d_model, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, vocab_size=len(tok),
            max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=c.scale_factor,
        pad_token_id=tok.pad_token_id,
        architectures=["Idefics3ForConditionalGeneration"],
    )
    model = Idefics3ForConditionalGeneration(hf_config).eval()
    return save_tiny(model, processor, path)
