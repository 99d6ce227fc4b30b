"""LLaVA-1.5 (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf).

One image -> one `<image>` placeholder -> (H/p) x (W/p) patch tokens in row-major order on a single tile; with
`vision_feature_select_strategy="full"` the CLS token comes first (not a patch). The vision tower is CLIP, the
projector a two-layer MLP.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from probes.models.families.base import FamilyAdapter, boxes_frame, cached_boxes, clip_view, grid_layout, not_patches
from probes.models.families.registry import UnsupportedModelError
from probes.models.tiny import build_tokenizer, save_tiny

# The chat template of llava-hf/llava-1.5-7b-hf (images first, then text; BOS comes from the tokenizer).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"  # noqa: E501 (the template verbatim)
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"  # noqa: E501 (the template verbatim)
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


class Adapter(FamilyAdapter):
    name = "llava"
    placeholder = "<image>"
    lm_layers_path = "model.language_model.layers"
    vision_layers_path = "model.vision_tower.encoder.layers"
    projector_path = "model.multi_modal_projector"
    VISION_TOWERS = ("clip_vision_model", "siglip_vision_model")

    def __init__(self, processor, hf_config) -> None:
        # LlavaForConditionalGeneration also serves Pixtral (mistral-community/pixtral-12b: its own vision tower,
        # [IMG] and [IMG_BREAK] tokens), whose image-token layout this adapter does not know.
        tower = getattr(getattr(hf_config, "vision_config", None), "model_type", None)
        if tower not in self.VISION_TOWERS:
            raise UnsupportedModelError(f"llava: a {tower!r} vision tower is not supported (expected one of "
                                        f"{', '.join(self.VISION_TOWERS)}; Pixtral checkpoints need an adapter "
                                        "of their own)")
        super().__init__(processor, hf_config)

    def patch_layout(self, ids, processed):
        h, w = processed["pixel_values"].shape[-2:]
        p = self.hf_config.vision_config.patch_size
        rows, cols = h // p, w // p
        extra = len(ids) - rows * cols  # 1 when the CLS token is kept ("full" strategy)
        if extra not in (0, 1):
            raise ValueError(f"llava: {len(ids)} image tokens for a {rows}x{cols} patch grid")
        parts = [not_patches(extra), grid_layout(rows, cols)]
        tile, r, c = (np.concatenate(x) for x in zip(*parts))
        return tile, r, c, {0: (rows, cols)}

    @cached_boxes
    def token_boxes(self, image_size):
        """CLIP preprocessing ([pad to square,] resize shortest edge, centre crop), then p x p patches."""
        tile, r, c = self._patch_tokens(image_size)
        ip = self.processor.image_processor
        pad = bool(getattr(ip, "do_pad", False)) and hasattr(ip, "pad_to_square")  # LlavaImageProcessor only
        view, _, _ = clip_view(ip, image_size[1], image_size[0], pad_square=pad)
        p = self.hf_config.vision_config.patch_size
        return boxes_frame(tile, r, c, view.cells(r, c, p, p), image_size)


def build_tiny(path: Path, image_size: int = 64, patch_size: int = 8, n_layers: int = 2, d_model: int = 64,
               vision_layers: int = 2, d_vision: int = 32, n_heads: int = 4) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = build_tokenizer(["<image>"])
    tok.chat_template = CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
            num_attention_heads=n_heads, image_size=image_size, patch_size=patch_size, projection_dim=d_vision,
        ),
        text_config=LlamaConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads, vocab_size=len(tok),
            max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        architectures=["LlavaForConditionalGeneration"],
    )
    model = LlavaForConditionalGeneration(config).eval()
    return save_tiny(model, processor, path)
