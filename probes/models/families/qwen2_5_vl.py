"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, e.g. Qwen/Qwen2.5-VL-3B-Instruct).

The chat template writes `<|vision_start|><|image_pad|><|vision_end|>` per image; the processor expands the one
`<|image_pad|>` into (grid_h/merge) x (grid_w/merge) `<|image_pad|>` tokens, so the start/end wrappers stay template
tokens. The image is resized (aspect kept) to multiples of patch_size * merge_size (28 px), cut into 14 px patches
that are flattened 2x2-merge-block by block (blocks row-major, the 4 patches of a block consecutive), and
`image_grid_thw` = (1, grid_h, grid_w) in patches. The ViT permutes the merge blocks into attention windows, the
merger folds each block into one token, and the tower un-permutes at the very end: LM image token k is merge block
(k // cols, k % cols), one tile, row-major. Note: the tower's hidden states (vision layer hooks) and the merger's
output (projector hook) are in *window* order, not this order.

Positions: the LM uses 3-D M-RoPE ids (temporal, height, width) from `get_rope_index` over the whole sequence (an
image's tokens get (t0, t0+row, t0+col), text after it resumes at t0 + max(rows, cols)), so `position_ids` computes
them once and each KV-cache chunk takes its slice. Qwen tokenizers add no BOS.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from probes.models.families.base import FamilyAdapter, View, boxes_frame, cached_boxes, grid_layout
from probes.models.processors import build_without_video
from probes.models.tiny import build_tokenizer, save_tiny

# The chat template of Qwen/Qwen2.5-VL-3B-Instruct (chat_template.json), verbatim: a default system prompt when the
# first message is not a system message; images inline where they appear in the content list.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# Qwen2-VL's added special tokens, in the real vocabulary's order.
SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
]


class Adapter(FamilyAdapter):
    name = "qwen2_5_vl"
    placeholder = "<|image_pad|>"
    lm_layers_path = "model.language_model.layers"
    vision_layers_path = "model.visual.blocks"
    projector_path = "model.visual.merger"  # its output is in window order (see the module docstring)
    end_of_turn_tokens = ("<|im_end|>",)

    def patch_layout(self, ids, processed):
        _, h, w = processed["image_grid_thw"][0].tolist()
        m = self.hf_config.vision_config.spatial_merge_size
        rows, cols = h // m, w // m
        if len(ids) != rows * cols:
            raise ValueError(f"qwen2_5_vl: {len(ids)} image tokens for a {rows}x{cols} merged grid")
        tile, r, c = grid_layout(rows, cols)
        return tile, r, c, {0: (rows, cols)}

    @cached_boxes
    def token_boxes(self, image_size):
        """The image is resized (aspect kept, `smart_resize`) to rows x cols merge blocks of m*p px; a token is one
        block, so its box is that block scaled back (the grid comes from the processor's own image_grid_thw)."""
        tile, r, c = self._patch_tokens(image_size)
        rows, cols = self.expand_image(Image.new("RGB", tuple(image_size))).grid[0]
        ip = self.processor.image_processor
        unit = int(ip.patch_size) * int(ip.merge_size)
        view = View(sx=cols * unit / image_size[0], sy=rows * unit / image_size[1])
        return boxes_frame(tile, r, c, view.cells(r, c, unit, unit), image_size)

    def image_inputs(self, images):
        return super().image_inputs(images) if images else {}  # the processor fails on an empty image list

    positions_need_images = True

    def position_ids(self, model, input_ids, image_inputs):
        """M-RoPE ids [3, 1, L] of the whole sequence, from the model's own `get_rope_index`."""
        image_mask = self.image_token_mask(input_ids)
        return model.model.get_rope_index(
            input_ids, mm_token_type_ids=image_mask.int(), image_grid_thw=image_inputs.get("image_grid_thw")
        )[0]


def build_tiny(path: Path, n_layers: int = 2, d_model: int = 64, vision_layers: int = 2, d_vision: int = 32,
               n_heads: int = 4, max_tokens: int = 16, window_size: int = 56) -> Path:
    """Tiny Qwen2.5-VL: at most `max_tokens` image tokens per image; a 56 px window (2x2 merge blocks) so the
    window permutation is exercised on small images; last vision layer full attention, the others windowed."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = build_tokenizer(SPECIAL_TOKENS, bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False)
    tok.chat_template = CHAT_TEMPLATE
    px = dict(min_pixels=56 * 56, max_pixels=28 * 28 * max_tokens, patch_size=14, temporal_patch_size=2, merge_size=2)
    # PIL backend and no video processor: both need torchvision, which has no CPU build here.
    processor = build_without_video(Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil(**px), tok, CHAT_TEMPLATE)
    ids = tok.convert_tokens_to_ids
    half = d_model // n_heads // 2  # rotary frequencies per head
    hw = (half - half // 4) // 2  # height and width sections; temporal gets the rest ([16, 24, 24] at half=64)
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_layers, hidden_size=d_vision, intermediate_size=2 * d_vision, num_heads=n_heads,
            out_hidden_size=d_model, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=window_size, fullatt_block_indexes=[vision_layers - 1],
        ),
        text_config=dict(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, vocab_size=len(tok),
            max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[half - 2 * hw, hw, hw]),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    return save_tiny(model, processor, path)
