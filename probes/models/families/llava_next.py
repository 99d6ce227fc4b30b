"""LLaVA-NeXT / LLaVA-1.6 (`LlavaNextForConditionalGeneration`, e.g. llava-hf/llava-v1.6-mistral-7b-hf).

"AnyRes" tiling. The image processor picks the best grid resolution (`image_grid_pinpoints`) for the image,
resizes it to fit keeping its aspect ratio, pads it to that resolution (centred) and cuts it into `nh x nw` crops
of the vision tower's input size; pixel tile 0 is the whole image resized to one crop. Each tile gives an
`n x n` grid of patch tokens (n = image_size // patch_size, CLS dropped). One `<image>` placeholder becomes
(the model's `pack_image_features`, counted by the processor's `_get_number_of_features`):

1. the base view: n*n tokens, row-major, no newlines -> tile 0, (row, col) on its n x n grid;
2. the high-res part: the crops' token grids stitched into one `(nh*n) x (nw*n)` grid, *unpadded* (whole token
   rows, or columns, that only show the centring padding are cut from both sides, so the grid keeps the image's
   aspect ratio), then read row-major with an `image_newline` token after every row. A token of this part gets
   the crop it falls in (tile 1.., row-major over the crop grid: tile = 1 + crop_row * nw + crop_col) and its
   (row, col) on that crop's own n x n token grid, i.e. the index into the vision tower's output for pixel
   tile `tile`. So when unpadding cuts a crop, its rows/cols keep their numbering and the cut ones are simply
   absent (a crop at the top of a wide image may start at row 1); `grid[tile]` is still (n, n). Because rows
   run across the whole stitched grid, consecutive tokens visit crop 1's row r, then crop 2's row r, ...;
3. newline tokens are -1 (not patches).

LLaVA-OneVision uses the same packing plus an optional downsampling (see `probes.models.families.llava_onevision`),
so the layout is shared here as `anyres_layout`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from transformers.image_processing_utils import select_best_resolution

from probes.models.families.base import FamilyAdapter, View, boxes_frame, cached_boxes, clip_view, grid_layout
from probes.models.tiny import build_tokenizer, save_tiny

# chat_template.json of llava-hf/llava-v1.6-mistral-7b-hf (Mistral [INST] format, no generation prompt; BOS
# comes from the tokenizer).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + message['content'][0]['text'] "
    "+ '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def anyres_layout(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], crop_px: int, n: int,
                  max_crops: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, tuple[int, int]]]:
    """(tile, row, col, grid) of the tokens `pack_image_features` makes for one image of size (H, W).

    Mirrors the model: `get_anyres_image_grid_shape` -> `unpad_image` -> (OneVision, when `max_crops` is given)
    bilinear downsampling -> newline after each row. A downsampled token gets the source token nearest to the
    centre of its bilinear sample (see the OneVision module docstring).
    """
    H, W = (int(v) for v in image_hw)
    best_h, best_w = select_best_resolution([H, W], pinpoints)
    nh, nw = best_h // crop_px, best_w // crop_px
    full_h, full_w = nh * n, nw * n
    # unpad_image, verbatim arithmetic: cut the centring padding from the stitched token grid
    top, left, cur_h, cur_w = 0, 0, full_h, full_w
    if W / H > full_w / full_h:
        new_h = int(round(H * (full_w / W), 7))
        top = (full_h - new_h) // 2
        cur_h = full_h - 2 * top
    else:
        new_w = int(round(W * (full_h / H), 7))
        left = (full_w - new_w) // 2
        cur_w = full_w - 2 * left
    rows, cols = np.arange(cur_h), np.arange(cur_w)
    if max_crops is not None:
        ratio = math.sqrt(cur_h * cur_w / (max_crops * n**2))
        if ratio > 1.1:  # OneVision's anyres_max_N: bilinear resize to (cur_h // ratio, cur_w // ratio)
            out_h, out_w = int(cur_h // ratio), int(cur_w // ratio)
            # align_corners=False: output cell i is centred at (i + 0.5) * in / out in source cells
            rows = np.floor((np.arange(out_h) + 0.5) * cur_h / out_h).astype(np.int64)
            cols = np.floor((np.arange(out_w) + 0.5) * cur_w / out_w).astype(np.int64)
    gr, gc = np.meshgrid(rows + top, cols + left, indexing="ij")  # rows/cols on the stitched, padded grid
    tile = 1 + (gr // n) * nw + gc // n
    newline = np.full((len(rows), 1), -1)
    hi = [np.concatenate([a, newline], axis=1).ravel() for a in (tile, gr % n, gc % n)]
    base = grid_layout(n, n, 0)
    tile, r, c = (np.concatenate([b, h]) for b, h in zip(base, hi))
    grid = {k: (n, n) for k in range(nh * nw + 1)}
    return tile, r, c, grid


class Adapter(FamilyAdapter):
    name = "llava_next"
    placeholder = "<image>"
    lm_layers_path = "model.language_model.layers"
    vision_layers_path = "model.vision_tower.encoder.layers"  # transformers 5: CLIP/SigLIP towers are flat
    projector_path = "model.multi_modal_projector"

    def _max_crops(self) -> int | None:
        return None

    def patch_layout(self, ids, processed):
        vc = self.hf_config.vision_config
        tile, r, c, grid = anyres_layout(
            processed["image_sizes"][0].tolist(), self.hf_config.image_grid_pinpoints, vc.image_size,
            vc.image_size // vc.patch_size, self._max_crops(),
        )
        if len(tile) != len(ids):
            raise ValueError(f"{self.name}: the processor made {len(ids)} image tokens, the model's packing "
                             f"{len(tile)} (vision_feature_select_strategy / image size mismatch?)")
        return tile, r, c, grid

    @cached_boxes
    def token_boxes(self, image_size):
        """Base view: the image resized to size x size (aspect not kept). High-res part: the image resized into the
        best pinpoint resolution (aspect kept), centred on padding, cut into crops; a token's box is its cell on
        the stitched, unpadded (OneVision: maybe downsampled) token grid, mapped back through the crops."""
        from transformers.image_processing_utils import get_patch_output_size

        W, H = image_size
        tile, r, c = self._patch_tokens(image_size)
        ip, vc = self.processor.image_processor, self.hf_config.vision_config
        p, n = vc.patch_size, vc.image_size // vc.patch_size
        sz = ip.size
        S = (sz.height, sz.width) if sz.height and sz.width else (sz.shortest_edge, sz.shortest_edge)
        P = ip.crop_size.height if ip.crop_size is not None and ip.crop_size.height else (sz.height or sz.shortest_edge)
        # Every pixel tile goes through the processor's resize(size) [+ centre crop] once more.
        base, _, _ = clip_view(ip, S[0], S[1], View(sx=S[1] / W, sy=S[0] / H))
        post, _, _ = clip_view(ip, P, P)
        boxes = np.zeros((len(tile), 4))
        nb = n * n
        boxes[:nb] = base.cells(r[:nb], c[:nb], p, p)
        # The high-res part: the stitched grid as the model unpads (and OneVision downsamples) it.
        bh, bw = select_best_resolution([H, W], ip.image_grid_pinpoints)
        rh, rw = get_patch_output_size(np.broadcast_to(np.zeros((1, 1, 1)), (3, H, W)), (bh, bw), "channels_first")
        pad_t, pad_l = (bh - rh) // 2, (bw - rw) // 2
        mh, mw = select_best_resolution([H, W], self.hf_config.image_grid_pinpoints)
        nh, nw = mh // vc.image_size, mw // vc.image_size
        top, left, cur_h, cur_w = _unpad(H, W, nh * n, nw * n)
        out_h, out_w = cur_h, cur_w
        max_crops = self._max_crops()
        if max_crops is not None and math.sqrt(cur_h * cur_w / (max_crops * n**2)) > 1.1:
            ratio = math.sqrt(cur_h * cur_w / (max_crops * n**2))
            out_h, out_w = int(cur_h // ratio), int(cur_w // ratio)
        if len(tile) - nb != out_h * out_w:
            raise ValueError(f"{self.name}: {len(tile) - nb} high-res tokens, expected {out_h}x{out_w}")
        i, j = np.divmod(np.arange(out_h * out_w), out_w)
        g = [top + i * cur_h / out_h, left + j * cur_w / out_w, top + (i + 1) * cur_h / out_h,
             left + (j + 1) * cur_w / out_w]  # (y0, x0, y1, x1) on the stitched token grid
        # the token's own (tile, row, col) is the source token under its centre: a check on this arithmetic
        cy = top + np.floor((i + 0.5) * cur_h / out_h).astype(int)  # anyres_layout's own float arithmetic
        cx = left + np.floor((j + 0.5) * cur_w / out_w).astype(int)
        if not (np.array_equal(1 + (cy // n) * nw + cx // n, tile[nb:]) and np.array_equal(cy % n, r[nb:])
                and np.array_equal(cx % n, c[nb:])):
            raise ValueError(f"{self.name}: token boxes disagree with the token layout for a {W}x{H} image")

        def to_padded(u: np.ndarray, end: bool, s: float, o: float) -> np.ndarray:
            """Stitched token coordinate -> padded-image pixel, through the crop it falls in."""
            k = np.ceil(u / n) - 1 if end else np.floor(u / n)
            k = np.clip(k, 0, None)
            return k * P + ((u - k * n) * p - o) / s

        y0, x0 = to_padded(g[0], False, post.sy, post.oy), to_padded(g[1], False, post.sx, post.ox)
        y1, x1 = to_padded(g[2], True, post.sy, post.oy), to_padded(g[3], True, post.sx, post.ox)
        hi = View(sx=rw / W, sy=rh / H, ox=pad_l, oy=pad_t)
        boxes[nb:] = hi.back(x0, y0, x1, y1)
        return boxes_frame(tile, r, c, boxes, image_size)


def _unpad(H: int, W: int, full_h: int, full_w: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the stitched token grid that `unpad_image` keeps (its own arithmetic)."""
    if W / H > full_w / full_h:
        new_h = int(round(H * (full_w / W), 7))
        top = (full_h - new_h) // 2
        return top, 0, full_h - 2 * top, full_w
    new_w = int(round(W * (full_h / H), 7))
    left = (full_w - new_w) // 2
    return 0, left, full_h, full_w - 2 * left


def build_tiny(path: Path, crop_px: int = 32, patch_size: int = 8, n_layers: int = 2, d_model: int = 64,
               vision_layers: int = 2, d_vision: int = 32, n_heads: int = 4) -> Path:
    """Tiny LLaVA-NeXT: CLIP 32px crops of 4x4 tokens, the real checkpoint's pinpoints scaled 336 -> 32."""
    from transformers import (
        CLIPVisionConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    tok = build_tokenizer(["<image>"])  # Llama/Mistral-style: the tokenizer adds BOS
    tok.chat_template = CHAT_TEMPLATE
    pinpoints = [[crop_px * a, crop_px * b] for a, b in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": crop_px}, crop_size={"height": crop_px, "width": crop_px},
        image_grid_pinpoints=pinpoints, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
            num_attention_heads=n_heads, image_size=crop_px, patch_size=patch_size, projection_dim=d_vision,
        ),
        text_config=MistralConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads, vocab_size=len(tok),
            max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, sliding_window=None,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        architectures=["LlavaNextForConditionalGeneration"],
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    return save_tiny(model, processor, path)
