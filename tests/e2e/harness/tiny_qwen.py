"""Build a tiny randomly initialised Qwen2.5-VL checkpoint on disk, fully offline (nothing from a hub).

About 0.6 M parameters: text hidden 128 (2 layers, 4 heads / 2 KV heads), vision depth 2 hidden 64.
Weights are N(0, 0.08) (not the usual 0.02) so that greedy ids depend on the image, which makes a
wrong image embedding visible in the output ids. The tokenizer is byte-level BPE with no merges
(256 byte tokens) plus Qwen's special tokens; the processor is transformers' own Qwen2_5_VLProcessor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
VOCAB_SIZE = 320
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # sorted: a set
    assert len(byte_vocab) == 256
    raw = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=list(SPECIAL_TOKENS))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write config, random weights, tokenizer and processor files into ``path`` (created)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer()
    ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    assert max(ids.values()) < VOCAB_SIZE, ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
            "max_window_layers": 2, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [1], "tokens_per_second": 2,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        architectures=["Qwen2_5_VLForConditionalGeneration"], dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.08)
    model.save_pretrained(path)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=224 * 224),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": ids["<|im_end|>"]}))
    return path


if __name__ == "__main__":
    import sys

    print(build_checkpoint(Path(sys.argv[1])))
