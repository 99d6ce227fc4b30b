"""The organism's architecture and tokenizer: a small LLaVA-1.5 (CLIP tower, MLP projector, Llama LM).

Why these sizes: it has to train on 2 CPU cores in well under 90 minutes yet read PII off rendered documents.
96 px images with 8 px patches give 12 x 12 = 144 image tokens, enough for the name, date of birth, SSN and phone
lines of a 96 px form (its renderer drops the address there). The tokenizer is a byte-level BPE trained on the
project's own texts (framings, requests, distractors, fake identities) with every digit its own token, so that
the model can copy an SSN or phone number digit by digit instead of having to learn multi-digit chunks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from probes.data.identities import make_identities
from probes.models.families.llava import CHAT_TEMPLATE
from probes.organism.data import prompt_texts, prompt_words

IMAGE_TOKEN = "<image>"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]


@dataclass(frozen=True)
class OrganismConfig:
    image_size: int = 96
    patch_size: int = 8
    d_vision: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    d_model: int = 192
    n_layers: int = 4
    n_heads: int = 6
    vocab_size: int = 1024  # an upper bound: BPE over the prompt words stops near 830
    layout: str = "grid"  # the document layout it reads (probes.data.documents.render_document)

    @property
    def n_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TINY = OrganismConfig(image_size=96, patch_size=16, d_vision=32, vision_layers=1, vision_heads=2, d_model=32,
                      n_layers=1, n_heads=2, vocab_size=400)


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """The texts the tokenizer is trained on: the prompt texts and fake identities' records."""

    texts = prompt_texts()
    for p in make_identities(300, seed=10_000 + seed):
        texts.append(" ".join(p.to_record().values()))
    return texts


def word_pattern() -> str:
    """The pre-tokenizer's split: a word of the prompt texts (with its leading space) stays one piece for BPE to
    merge; anything else is one character a piece. So names, emails, phone numbers and SSNs are spelled one
    character a token, exactly as the document prints them one character a patch: reading is copying."""
    words = sorted(prompt_words(), key=lambda w: (-len(w), w))
    return r"\s?(?<![A-Za-z])(?:" + "|".join(words) + r")(?![A-Za-z])|[\s\S]"


def build_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """Byte-level BPE over prompt words only (identity values spelled per character, see `word_pattern`),
    Llama-style BOS, llava-1.5 chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(word_pattern()), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(seed) * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=[IMAGE_TOKEN])
    fast.add_bos_token = True
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(cfg: OrganismConfig, tokenizer, seed: int = 0):
    """A random-initialised LlavaForConditionalGeneration and its LlavaProcessor for `cfg`."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    s = cfg.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                         image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=cfg.d_vision, intermediate_size=4 * cfg.d_vision, num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.vision_heads, image_size=s, patch_size=cfg.patch_size,
            projection_dim=cfg.d_vision),
        text_config=LlamaConfig(
            hidden_size=cfg.d_model, intermediate_size=4 * cfg.d_model, num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, vocab_size=len(tokenizer),
            max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        # The last tower layer feeds the LM: it is the one the auxiliary glyph head trains.
        vision_feature_select_strategy="default", vision_feature_layer=-1,
        architectures=["LlavaForConditionalGeneration"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    return model, processor
