r"""Gemma 3 (`Gemma3ForConditionalGeneration`, e.g. google/gemma-3-4b-it).

The chat template writes `{{ bos_token }}` itself and one `<start_of_image>` (the processor's boi token) per image.
The processor replaces that text with

    "\n\n<start_of_image>" + "<image_soft_token>" * mm_tokens_per_image + "<end_of_image>\n\n"

and only then tokenizes. The soft tokens are the SigLIP patch grid (image_size / patch_size squared, 64x64 for
4b-it) average-pooled to sqrt(mm_tokens_per_image) squared (16x16 = 256), in row-major order, on one tile. With
pan-and-scan (off in the released preprocessor configs) the original image (tile 0) is followed by its crops
(tiles 1..), each its own boi ... eoi block. Wrapper and newline tokens are not patches (-1).

Image soft tokens attend to each other *bidirectionally* within an image, which the model does only when given
`token_type_ids` (1 = soft token) for the whole sequence so far: `forward_extras` passes them for every chunk.

Gemma's tokenizer has single tokens for runs of newlines, so in the processor's output the expansion's "\n\n"
fuses with a neighbouring newline ("user\n" + "\n\n" -> "\n\n\n"); `probes.models.render` expands placeholders in the
text before tokenizing, as the processor does, so it gets the same tokens. The tokenizer also adds BOS itself, and
the template writes it too: `processor(text=templated)` needs add_special_tokens=False to give the model's input.

The template merges a system prompt into the first user turn ("<start_of_turn>user\n" + system + "\n\n" + ...);
rendered alone, [system] is just "<bos>", so turn 0 of the token map is the BOS and the system text (segment
"system") lies in turn 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probes.models.families.base import FamilyAdapter, View, boxes_frame, cached_boxes
from probes.models.tiny import TinySizes, build_tokenizer, save_tiny

# The chat template of google/gemma-3-4b-it (chat_template.json), verbatim.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)

SPECIAL_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
NEWLINE_RUNS = ["\n\n", "\n\n\n", "\n\n\n\n"]  # single tokens in Gemma's vocabulary (it has longer runs too)


class Adapter(FamilyAdapter):
    name = "gemma3"
    placeholder = "<start_of_image>"  # the boi token: what the template writes and the processor expands
    lm_layers_path = "model.language_model.layers"
    vision_layers_path = "model.vision_tower.encoder.layers"  # transformers 5's SiglipVisionModel has no .vision_model
    projector_path = "model.multi_modal_projector"
    end_of_turn_tokens = ("<end_of_turn>",)

    @property
    def image_token_id(self) -> int:
        return int(self.hf_config.image_token_id)

    def patch_layout(self, ids, processed):
        side = math.isqrt(int(self.hf_config.mm_tokens_per_image))
        boi = self.placeholder_id
        tile, row, col = np.full(len(ids), -1), np.full(len(ids), -1), np.full(len(ids), -1)
        t, q = -1, 0
        for j, tid in enumerate(ids):
            if tid == boi:  # each boi ... eoi block is one view: the image, then any pan-and-scan crops
                t, q = t + 1, 0
            elif tid == self.image_token_id:
                tile[j], (row[j], col[j]) = t, divmod(q, side)
                q += 1
        n_tiles = t + 1
        if n_tiles != len(processed["pixel_values"]) or (tile >= 0).sum() != n_tiles * side * side:
            raise ValueError(f"gemma3: {(tile >= 0).sum()} soft tokens in {n_tiles} views for "
                             f"{len(processed['pixel_values'])} pixel tensors of {side}x{side} tokens")
        return tile, row, col, {k: (side, side) for k in range(n_tiles)}

    @cached_boxes
    def token_boxes(self, image_size):
        """Each view (the whole image, then any pan-and-scan crops) is resized to size.height x size.width, no
        aspect kept; its `side x side` soft tokens pool equal squares of it."""
        W, H = image_size
        tile, r, c = self._patch_tokens(image_size)
        ip = self.processor.image_processor
        # The processor's own images_kwargs (do_pan_and_scan=False ...) override the image processor's attributes.
        keys = ("do_pan_and_scan", "pan_and_scan_min_crop_size", "pan_and_scan_max_num_crops",
                "pan_and_scan_min_ratio_to_activate")
        given = getattr(self.processor, "images_kwargs", {})
        opt = {k: given[k] if k in given else getattr(ip, k, None) for k in keys}
        sh, sw = int(ip.size.height), int(ip.size.width)
        views = {0: View(sx=sw / W, sy=sh / H)}
        if opt["do_pan_and_scan"]:
            for k, (top, left, ch, cw) in enumerate(_pan_and_scan_crops(H, W, opt)):
                views[k + 1] = View(ox=-left, oy=-top).then(sx=sw / cw, sy=sh / ch)
        if set(np.unique(tile)) - set(views):
            raise ValueError(f"gemma3: the token layout has views {sorted(set(np.unique(tile)))}, pan-and-scan "
                             f"arithmetic gives {len(views)}")
        side = math.isqrt(int(self.hf_config.mm_tokens_per_image))
        boxes = np.zeros((len(tile), 4))
        for t, view in views.items():
            m = tile == t
            boxes[m] = view.cells(r[m], c[m], sh / side, sw / side)
        return boxes_frame(tile, r, c, boxes, image_size)

    def forward_extras(self, input_ids, start, end):
        # The bidirectional image mask is read by absolute position, so a chunk needs the types from position 0.
        return {"token_type_ids": (input_ids[:, :end] == self.image_token_id).long()}


def _pan_and_scan_crops(H: int, W: int, opt: dict) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of the pan-and-scan crops of an H x W image (`Gemma3ImageProcessor`'s rule)."""
    if W >= H:
        if W / H < opt["pan_and_scan_min_ratio_to_activate"]:
            return []
        nw = min(int(math.floor(W / opt["pan_and_scan_min_crop_size"])), int(math.floor(W / H + 0.5)))
        nw, nh = min(opt["pan_and_scan_max_num_crops"], max(2, nw)), 1
    else:
        if H / W < opt["pan_and_scan_min_ratio_to_activate"]:
            return []
        nh = min(int(math.floor(H / opt["pan_and_scan_min_crop_size"])), int(math.floor(H / W + 0.5)))
        nw, nh = 1, min(opt["pan_and_scan_max_num_crops"], max(2, nh))
    cw, ch = int(math.ceil(W / nw)), int(math.ceil(H / nh))
    if min(cw, ch) < opt["pan_and_scan_min_crop_size"]:
        return []
    return [(i * ch, j * cw, min(ch, H - i * ch), min(cw, W - j * cw)) for i in range(nh) for j in range(nw)]


@dataclass(frozen=True)
class TinyConfig(TinySizes):
    """A tiny Gemma 3: `image_size` px images of `patch_size` px patches, pooled to `mm_tokens_per_image` soft
    tokens (a square number whose side divides the patch grid's); `sliding_window` shorter than a session."""

    image_size: int = 64
    patch_size: int = 8
    mm_tokens_per_image: int = 16
    sliding_window: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        side, grid = math.isqrt(self.mm_tokens_per_image), self.image_size // self.patch_size
        if self.image_size % self.patch_size or side * side != self.mm_tokens_per_image or grid % side:
            raise ValueError(f"TinyConfig: image_size {self.image_size} must be a multiple of patch_size "
                             f"{self.patch_size}, and mm_tokens_per_image {self.mm_tokens_per_image} a square whose "
                             f"side divides the {grid}x{grid} patch grid's")


def build_tiny(path: str | os.PathLike, config: TinyConfig | None = None, **sizes: Any) -> Path:
    """A tiny Gemma 3 checkpoint at `path`: `config`, or its fields as keywords (`TinyConfig`)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    c = TinyConfig.of(config, sizes)

    # Gemma's tokenizer adds BOS itself *and* the template writes it: `processor(text=templated)` with the default
    # add_special_tokens=True gives two BOS tokens, as with the real checkpoint.
    tok = build_tokenizer(
        SPECIAL_TOKENS, bos="<bos>", eos="<eos>", pad="<pad>", add_bos=True,
        extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    tok.add_tokens(NEWLINE_RUNS)  # ordinary (not special) tokens, as in Gemma's vocabulary
    tok.chat_template = CHAT_TEMPLATE
    image_processor = Gemma3ImageProcessor(
        size={"height": c.image_size, "width": c.image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        resample=2, do_pan_and_scan=None,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=CHAT_TEMPLATE,
                                image_seq_length=c.mm_tokens_per_image)
    ids = tok.convert_tokens_to_ids
    hf_config = Gemma3Config(
        vision_config=SiglipVisionConfig(
            hidden_size=c.d_vision, intermediate_size=2 * c.d_vision, num_hidden_layers=c.vision_layers,
            num_attention_heads=c.n_heads, image_size=c.image_size, patch_size=c.patch_size, vision_use_head=False,
        ),
        text_config=Gemma3TextConfig(
            hidden_size=c.d_model, intermediate_size=2 * c.d_model, num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads, num_key_value_heads=max(1, c.n_heads // 2),
            head_dim=c.d_model // c.n_heads,
            query_pre_attn_scalar=c.d_model // c.n_heads, vocab_size=len(tok), max_position_embeddings=4096,
            # a window shorter than a session, so the sliding-window KV cache is exercised (4b-it: 1024)
            sliding_window=c.sliding_window,
            layer_types=["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(c.n_layers)],
            bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, ids("<end_of_turn>")],
            pad_token_id=tok.pad_token_id,
        ),
        mm_tokens_per_image=c.mm_tokens_per_image,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        architectures=["Gemma3ForConditionalGeneration"],
    )
    model = Gemma3ForConditionalGeneration(hf_config).eval()
    # HF initialises the projector to zeros (all image tokens would embed alike): give it random weights.
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.05)
    return save_tiny(model, processor, path)
