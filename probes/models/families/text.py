"""Text-only causal LMs (Llama, Qwen2, Mistral, Gemma 3 text): the language backbone without a vision tower.

Useful as the control the MLLM families are compared against (the same sessions, minus the images); a session
with images is refused when rendered for one of these.
"""

from __future__ import annotations

from pathlib import Path

from probes.models.families.base import FamilyAdapter
from probes.models.tiny import build_tokenizer, save_tiny

# ChatML, as in Qwen2 instruct checkpoints (used for the tiny model; a real checkpoint brings its own template).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"  # noqa: E501 (the template verbatim)
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class Adapter(FamilyAdapter):
    name = "text"
    placeholder = None
    lm_layers_path = "model.layers"
    vision_layers_path = None
    projector_path = None
    end_of_turn_tokens = ("<|im_end|>",)

    def patch_layout(self, ids, processed):  # pragma: no cover - text-only models have no images
        raise TypeError("text-only model: no image layout")


def build_tiny(path: Path, n_layers: int = 2, d_model: int = 64, n_heads: int = 4) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(["<|im_start|>", "<|im_end|>"], add_bos=False)
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_heads, vocab_size=len(tok), max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    return save_tiny(LlamaForCausalLM(config).eval(), tok, path)
