"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`, e.g. llava-hf/llava-onevision-qwen2-0.5b-ov-hf).

SigLIP vision tower (no CLS, all n x n patch tokens kept), Qwen2 language model, and LLaVA-NeXT's AnyRes packing
(see `probes.models.families.llava_next`): base view first (tile 0, n x n, no newlines), then the crops stitched into
one grid, unpadded, and read row-major with an `image_newline` token (-1) after each row; a high-res token gets its
crop (tile 1.., row-major over the crop grid) and its (row, col) on that crop's own n x n token grid.

Difference, `vision_aspect_ratio="anyres_max_9"`: when the unpadded grid holds more than ~1.1^2 x 9 crops' worth
of tokens, the model bilinearly downsamples it by `ratio` to (h // ratio) x (w // ratio) before adding newlines.
A downsampled token blends up to 2x2 source tokens; we give it the crop and (row, col) of the source token
nearest the centre of its bilinear sample. Then some crop cells have no token and, where the sample centre
falls exactly between two source tokens, the later one (the higher row or column) is chosen.

Several images: the processor packs images given as a flat list one by one with AnyRes (`batch_num_images` all
1), which is what `expand_image` (one image at a time) and `image_inputs` both do, so a session's expansions and
its pixel inputs agree. (Images nested in one sample, `[[a, b]]`, would get the multi-image mode: base view
only; we do not use it.)
"""

from __future__ import annotations

from pathlib import Path

from probes.models.families.llava_next import Adapter as LlavaNextAdapter
from probes.models.processors import build_without_video
from probes.models.tiny import build_tokenizer, save_tiny

# chat_template.json of llava-hf/llava-onevision-qwen2-0.5b-ov-hf (as written by transformers'
# convert_llava_onevision_weights_to_hf.py). Qwen: no BOS.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Adapter(LlavaNextAdapter):
    name = "llava_onevision"
    placeholder = "<image>"
    end_of_turn_tokens = ("<|im_end|>",)

    def _max_crops(self) -> int | None:
        return int(self.hf_config.vision_aspect_ratio.removeprefix("anyres_max_"))


def build_tiny(path: Path, crop_px: int = 16, patch_size: int = 4, n_layers: int = 2, d_model: int = 64,
               vision_layers: int = 2, d_vision: int = 32, n_heads: int = 4) -> Path:
    """Tiny OneVision: SigLIP 16px crops of 4x4 tokens, the real 6x6 pinpoint set scaled 384 -> 16."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil as LlavaOnevisionImageProcessor,
    )

    tok = build_tokenizer(["<|im_start|>", "<image>", "<video>"], bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                          add_bos=False)
    tok.chat_template = CHAT_TEMPLATE
    pinpoints = [[crop_px * a, crop_px * b] for a in range(1, 7) for b in range(1, 7)]
    size = {"height": crop_px, "width": crop_px}
    image_processor = LlavaOnevisionImageProcessor(
        size=size, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    n = crop_px // patch_size
    # PIL backend and no video processor: both need torchvision, which has no CPU build here.
    processor = build_without_video(
        LlavaOnevisionProcessor, image_processor, tok, CHAT_TEMPLATE, num_image_tokens=n * n,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=d_vision, intermediate_size=2 * d_vision, num_hidden_layers=vision_layers,
            num_attention_heads=n_heads, image_size=crop_px, patch_size=patch_size, vision_use_head=False,
        ),
        text_config=Qwen2Config(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, vocab_size=len(tok),
            max_position_embeddings=4096, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        ),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
        architectures=["LlavaOnevisionForConditionalGeneration"],
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    return save_tiny(model, processor, path)
