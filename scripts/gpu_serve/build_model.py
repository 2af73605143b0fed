"""Write an offline model directory for `--load-format dummy`: config, tokenizer and processor files, no weights.

Families (public shapes; SGLang's dummy loader fills random weights on the GPU):

  qwen2_5_vl_7b   Qwen2.5-VL-7B-Instruct   (same files as /work/shared/gpu-server/build_model.py --preset 7b)
  qwen2_5_vl_3b   Qwen2.5-VL-3B-Instruct
  qwen3_vl_8b     Qwen3-VL-8B-Instruct     (deepstack [8,16,24], patch 16, interleaved mrope [24,20,20])
  gemma3_12b      gemma-3-12b-it           (SigLIP so400m 896/14, 256 tokens per image, SWA 1024 pattern 6)
  gemma4_e4b      gemma-4-E4B-it           (Gemma4ForConditionalGeneration: 768-wide 16-block ViT, patch 16,
                                            3x3 pooling, <= 280 tokens per image; PLE, 18 KV-shared layers)
  gemma4_e2b      gemma-4-E2B-it           (same tower; 35 layers, 20 KV-shared, double-wide MLP)
  <family>_tiny   qwen2_5_vl_tiny, qwen3_vl_tiny, gemma3_tiny, gemma4_tiny: tiny text/vision towers, same vocabulary,
                  special ids and processors (for CPU rehearsals).

Tokenizers are synthetic but keep each model's real special-token ids, so prompts look like the real model's:
byte-level BPE without merges (one token per UTF-8 byte), filler tokens for the other ids. The number of text
tokens differs from the real tokenizer (about 1 token per byte instead of ~4 bytes); image/video token counts,
which are what the vision encoder and the mm scheduler see, are the real ones. Chat templates keep the real
templates' multimodal placeholders (OpenAI image_url parts are turned into {"type": "image"} by SGLang).

Built with the transformers that SGLang will load (first on sys.path; 5.12.1 for sglang 0.5.16). Offline.

usage: python build_model.py OUT_DIR [--family NAME]           (NAME as above; default qwen2_5_vl_7b)
       python build_model.py OUT_DIR --preset 7b|3b|tiny        (old Qwen2.5-VL presets, as probe.sh calls it)
"""

from __future__ import annotations

import argparse
import json
import string
from pathlib import Path

# ----------------------------------------------------------------------------------------------------------
# Qwen (Qwen2 vocabulary: 151643 byte-level BPE tokens, then the special tokens)
# ----------------------------------------------------------------------------------------------------------
QWEN25_SPECIAL = (  # Qwen2.5 order, ids 151643..151664
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN3_SPECIAL = (*QWEN25_SPECIAL, "<tool_response>", "</tool_response>", "<think>", "</think>")  # ..151668
QWEN_FIRST_SPECIAL_ID = 151643

# Same template as the project's tests/e2e/harness/tiny_qwen.py (OpenAI image_url parts included). Unlike the
# real Qwen2.5-VL template it adds no default system prompt (kept so that earlier measurements stay comparable).
QWEN25_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template, reduced to what a benchmark sends (no tools, no reasoning_content): like the
# real one, no default system prompt, and each image/video is <|vision_start|><|image_pad||video_pad|><|vision_end|>.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

QWEN25_VISION = {  # Qwen2.5-VL 3B and 7B share the vision tower
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
    "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu",
}
QWEN3_VISION_8B = {  # Qwen3-VL-8B-Instruct vision_config
    "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
    "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "out_hidden_size": 4096, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
    "initializer_range": 0.02,
}

# ----------------------------------------------------------------------------------------------------------
# Gemma 3 (262144-entry SentencePiece vocabulary + <image_soft_token> 262144; the model's vocab is 262208)
# ----------------------------------------------------------------------------------------------------------
GEMMA3_SPECIAL = {  # id -> token, the real gemma-3 ids
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>", 5: "[multimodal]",
    105: "<start_of_turn>", 106: "<end_of_turn>",
    255999: "<start_of_image>", 256000: "<end_of_image>", 262144: "<image_soft_token>",
}
GEMMA3_BYTE_FIRST_ID = 238  # where the real tokenizer keeps its byte-fallback tokens <0x00>..<0xFF> (238..493)
GEMMA3_TOKENIZER_LEN = 262145

# gemma-3-*-it's chat_template (verbatim apart from whitespace control): image parts become <start_of_image>,
# which Gemma3Processor expands to "\n\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\n\n".
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

GEMMA3_VISION = {  # siglip so400m/14 @ 896 (gemma-3 4b/12b/27b)
    "hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "num_attention_heads": 16,
    "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False, "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh", "num_channels": 3,
}

# ----------------------------------------------------------------------------------------------------------
# Gemma 4 (262144-entry vocabulary; the multimodal tokens sit inside it, at Gemma4Config's default ids)
# ----------------------------------------------------------------------------------------------------------
# Ids: Gemma4Config (transformers 5.12.1) defaults for boi/eoi/image/audio/video and boa/eoa; <turn|> = 106 from
# the conversion script's eos_token_id [1, 106]; the tool/channel/think/turn-open ids are the ones third-party
# tests of the real vocabulary use (scripts/gpu_serve/NOTES.md); only <|turn>/<turn|> appear in our prompts.
GEMMA4_SPECIAL = {  # 0..4 as in Gemma 3 (pad/eos/bos are Gemma4TextConfig's defaults)
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>", 50: "<|tool_response>",
    51: "<tool_response|>", 52: '<|"|>', 98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
    255999: "<|image>", 256000: "<|audio>",
    258880: "<|image|>", 258881: "<|audio|>", 258882: "<image|>", 258883: "<audio|>", 258884: "<|video|>",
}
GEMMA4_TOKENIZER_LEN = 262144
GEMMA4_EXTRA_SPECIAL = {  # as transformers' convert_gemma4_weights.py builds the tokenizer
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>", "eoc_token": "<channel|>",
    "think_token": "<|think|>", "escape_token": '<|"|>', "str_token": "<|tool_response>",
    "etr_token": "<tool_response|>", "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
    "std_token": "<|tool>", "etd_token": "<tool|>",
}

# Gemma 4 chat template, reduced to what a benchmark sends (no tools, no thinking): bos, an optional system turn,
# <|turn>{user|model}\n ... <turn|>\n, an image part -> <|image|> (which Gemma4Processor expands to
# <|image> + n x <|image|> + <image|>), a video part -> <|video|>, the generation prompt <|turn>model\n.
GEMMA4_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content | trim -}}"
    "{%- else -%}{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}{{- item['text'] | trim -}}"
    "{%- elif item['type'] == 'image' or 'image' in item or 'image_url' in item -%}{{- '<|image|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{- '<|video|>' -}}"
    "{%- elif item['type'] == 'audio' -%}{{- '<|audio|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|turn>system\n' -}}{{- render(messages[0]['content']) -}}{{- '<turn|>\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\n' -}}{{- render(message['content']) -}}{{- '<turn|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\n' -}}{%- endif -%}"
)

# transformers' convert_gemma4_weights.py: _ON_DEVICE_VISION_CONFIG (E2B, E4B) and _ROPE_PARAMS
GEMMA4_ON_DEVICE_VISION = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16, "num_attention_heads": 12,
    "num_key_value_heads": 12, "head_dim": 64, "pooling_kernel_size": 3, "patch_size": 16,
    "use_clipped_linears": True, "position_embedding_size": 10240,
}
GEMMA4_ROPE = {
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
}
GEMMA4_SOFT_TOKENS = 280  # vision_soft_tokens_per_image / image processor max_soft_tokens (default_output_length)

FAMILIES = {
    "qwen2_5_vl_7b": {
        "kind": "qwen2_5_vl",
        "text": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                 "num_attention_heads": 28, "num_key_value_heads": 4, "max_window_layers": 28,
                 "tie_word_embeddings": False},
        "vision": {**QWEN25_VISION, "out_hidden_size": 3584},
        "mrope_section": [16, 24, 24],
    },
    "qwen2_5_vl_3b": {
        "kind": "qwen2_5_vl",
        "text": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                 "num_attention_heads": 16, "num_key_value_heads": 2, "max_window_layers": 70,
                 "tie_word_embeddings": True},
        "vision": {**QWEN25_VISION, "out_hidden_size": 2048},
        "mrope_section": [16, 24, 24],
    },
    "qwen2_5_vl_tiny": {  # tests/e2e/harness/tiny_qwen.py shapes, but the full vocabulary (special ids as above)
        "kind": "qwen2_5_vl",
        "text": {"vocab_size": 151936, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_window_layers": 2,
                 "tie_word_embeddings": False},
        "vision": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 128,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                   "fullatt_block_indexes": [1], "tokens_per_second": 2},
        "mrope_section": [4, 6, 6],
    },
    "qwen3_vl_8b": {
        "kind": "qwen3_vl",
        "text": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                 "max_position_embeddings": 262144, "rope_theta": 5_000_000.0},
        "vision": QWEN3_VISION_8B,
        "mrope_section": [24, 20, 20],
        "tie_word_embeddings": False,
    },
    "qwen3_vl_tiny": {
        "kind": "qwen3_vl",
        "text": {"vocab_size": 151936, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                 "max_position_embeddings": 32768, "rope_theta": 5_000_000.0},
        "vision": {**QWEN3_VISION_8B, "depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                   "out_hidden_size": 128, "deepstack_visual_indexes": [0, 1]},
        "mrope_section": [6, 5, 5],  # sums to head_dim // 2
        "tie_word_embeddings": False,
    },
    "gemma3_12b": {
        "kind": "gemma3",
        "text": {"vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
                 "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
                 "query_pre_attn_scalar": 256, "sliding_window": 1024, "sliding_window_pattern": 6,
                 "max_position_embeddings": 131072, "rope_scaling_factor": 8.0},
        "vision": GEMMA3_VISION,
        "mm_tokens_per_image": 256,
    },
    "gemma3_tiny": {
        "kind": "gemma3",
        "text": {"vocab_size": 262208, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
                 "query_pre_attn_scalar": 32, "sliding_window": 64, "sliding_window_pattern": 2,
                 "max_position_embeddings": 32768, "rope_scaling_factor": 8.0},
        "vision": {**GEMMA3_VISION, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
                   "num_hidden_layers": 2},
        "mm_tokens_per_image": 256,
    },
    "gemma4_e4b": {  # convert_gemma4_weights.py _VARIANTS["gemma-4-e4b"]
        "kind": "gemma4",
        "text": {"hidden_size": 2560, "hidden_size_per_layer_input": 256, "intermediate_size": 4 * 2560,
                 "num_hidden_layers": 42, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7,
                 "num_attention_heads": 8, "num_key_value_heads": 2, "global_head_dim": 512,
                 "num_kv_shared_layers": 18, "final_logit_softcapping": 30.0},
        "vision": GEMMA4_ON_DEVICE_VISION,
        "audio": True,
    },
    "gemma4_e2b": {  # convert_gemma4_weights.py _VARIANTS["gemma-4-e2b"]
        "kind": "gemma4",
        "text": {"hidden_size": 1536, "hidden_size_per_layer_input": 256, "intermediate_size": 4 * 1536,
                 "num_hidden_layers": 35, "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
                 "num_attention_heads": 8, "num_key_value_heads": 1, "num_kv_shared_layers": 20,
                 "use_double_wide_mlp": True, "final_logit_softcapping": 30.0},
        "vision": GEMMA4_ON_DEVICE_VISION,
        "audio": True,
    },
    "gemma4_tiny": {  # tiny towers, same vocabulary, ids, processor (280 soft tokens, 3x3 pooling, patch 16);
        # SGLang wants each KV-shared layer's type among the unshared layers (gemma4_causal.Gemma4Attention)
        "kind": "gemma4",
        "text": {"hidden_size": 128, "hidden_size_per_layer_input": 16, "intermediate_size": 256,
                 "num_hidden_layers": 6, "layer_types": ["sliding_attention", "full_attention"] * 3,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "global_head_dim": 64,
                 "num_kv_shared_layers": 2, "sliding_window": 64, "final_logit_softcapping": 30.0},
        "vision": {**GEMMA4_ON_DEVICE_VISION, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32},
        "audio": False,
    },
}
LEGACY_PRESETS = {"7b": "qwen2_5_vl_7b", "3b": "qwen2_5_vl_3b", "tiny": "qwen2_5_vl_tiny"}


# ----------------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------------
def _filler(i: int) -> str:
    """A distinct printable multi-character token for id i (never equal to a one-character byte token)."""
    digits = string.ascii_letters + string.digits
    out = ""
    while True:
        i, r = divmod(i, len(digits))
        out = digits[r] + out
        if i == 0:
            break
    return out if len(out) > 1 else "a" + out + "_"


def _byte_level_vocab(size: int, byte_first_id: int, reserved: dict[int, str]) -> dict[str, int]:
    """token -> id for ids 0..size-1: the 256 ByteLevel symbols at byte_first_id.., `reserved` at their ids,
    filler tokens elsewhere."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(alphabet) == 256
    by_id = dict(reserved)
    for k, ch in enumerate(alphabet):
        assert byte_first_id + k not in by_id, byte_first_id + k
        by_id[byte_first_id + k] = ch
    vocab = {}
    for i in range(size):
        tok = by_id.get(i) or _filler(i)
        assert tok not in vocab, tok
        vocab[tok] = i
    return vocab


def _raw_byte_level(vocab: dict[str, int]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    raw.decoder = decoders.ByteLevel()
    return raw


def build_qwen_tokenizer(specials: tuple[str, ...], chat_template: str):
    from transformers import PreTrainedTokenizerFast

    raw = _raw_byte_level(_byte_level_vocab(QWEN_FIRST_SPECIAL_ID, 0, {}))
    raw.add_special_tokens(list(specials))  # in order: ids 151643.. as in Qwen2.5 / Qwen3
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=list(specials))
    tok.chat_template = chat_template
    ids = [tok.convert_tokens_to_ids(t) for t in specials]
    assert ids == list(range(QWEN_FIRST_SPECIAL_ID, QWEN_FIRST_SPECIAL_ID + len(specials))), ids
    return tok


def build_gemma3_tokenizer():
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    reserved = {i: t for i, t in GEMMA3_SPECIAL.items() if i < GEMMA3_TOKENIZER_LEN}
    for i in range(6, 105):  # <unused0>.. as in the real vocabulary (their exact ids do not matter here)
        reserved[i] = f"<unused{i - 6}>"
    raw = _raw_byte_level(_byte_level_vocab(GEMMA3_TOKENIZER_LEN, GEMMA3_BYTE_FIRST_ID, reserved))
    raw.add_special_tokens(list(GEMMA3_SPECIAL.values()))  # already in the vocabulary: keep their ids
    raw.post_processor = processors.TemplateProcessing(  # the real tokenizer prepends <bos> (add_bos_token)
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    for i, t in GEMMA3_SPECIAL.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    assert len(tok) == GEMMA3_TOKENIZER_LEN, len(tok)
    return tok


def build_gemma4_tokenizer():
    from transformers import PreTrainedTokenizerFast

    reserved = dict(GEMMA4_SPECIAL)
    for i in range(5, 238):  # the other low ids: placeholders, never produced from text (bytes are 238..493)
        reserved.setdefault(i, f"<unused{i}>")
    raw = _raw_byte_level(_byte_level_vocab(GEMMA4_TOKENIZER_LEN, GEMMA3_BYTE_FIRST_ID, reserved))
    raw.add_special_tokens(list(GEMMA4_SPECIAL.values()))  # already in the vocabulary: keep their ids
    # no post-processor: the real tokenizer has add_bos_token=False and the chat template writes <bos>
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", padding_side="left", extra_special_tokens=dict(GEMMA4_EXTRA_SPECIAL))
    tok.chat_template = GEMMA4_CHAT_TEMPLATE
    for i, t in GEMMA4_SPECIAL.items():
        assert tok.convert_tokens_to_ids(t) == i, (t, tok.convert_tokens_to_ids(t), i)
    assert len(tok) == GEMMA4_TOKENIZER_LEN, len(tok)
    return tok


# ----------------------------------------------------------------------------------------------------------
# model directories
# ----------------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_qwen_generation_config(out: Path, ids: dict[str, int]) -> None:
    """Greedy, with the family's own end-of-text ids (the same for Qwen2.5-VL and Qwen3-VL)."""
    _write_json(out / "generation_config.json",
                {"do_sample": False, "bos_token_id": ids["<|endoftext|>"],
                 "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]})


def build_qwen2_5_vl(out: Path, spec: dict) -> None:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tok = build_qwen_tokenizer(QWEN25_SPECIAL, QWEN25_CHAT_TEMPLATE)
    ids = {name: tok.convert_tokens_to_ids(name) for name in QWEN25_SPECIAL}
    text = {
        **spec["text"], "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "sliding_window": 32768, "use_sliding_window": False, "attention_dropout": 0.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": spec["mrope_section"]},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=spec["vision"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        architectures=["Qwen2_5_VLForConditionalGeneration"], dtype="bfloat16",
        tie_word_embeddings=spec["text"]["tie_word_embeddings"],
    )
    config.save_pretrained(out)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=1280 * 28 * 28),
        tokenizer=tok, video_processor=Qwen2VLVideoProcessor(min_pixels=56 * 56, max_pixels=448 * 448),
        chat_template=QWEN25_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    _write_qwen_generation_config(out, ids)


def build_qwen3_vl(out: Path, spec: dict) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLProcessor, Qwen3VLVideoProcessor

    tok = build_qwen_tokenizer(QWEN3_SPECIAL, QWEN3_CHAT_TEMPLATE)
    ids = {name: tok.convert_tokens_to_ids(name) for name in QWEN3_SPECIAL}
    t = dict(spec["text"])
    rope_theta = t.pop("rope_theta")
    text = {
        **t, "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "attention_dropout": 0.0,
        "initializer_range": 0.02, "use_cache": True, "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta,
                            "mrope_section": spec["mrope_section"], "mrope_interleaved": True},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
    }
    config = Qwen3VLConfig(
        text_config=text, vision_config=spec["vision"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        architectures=["Qwen3VLForConditionalGeneration"], dtype="bfloat16",
        tie_word_embeddings=spec["tie_word_embeddings"],
    )
    config.save_pretrained(out)
    # Qwen3-VL-8B-Instruct preprocessor_config.json / video_preprocessor_config.json values
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    video_processor = Qwen3VLVideoProcessor(
        size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16, temporal_patch_size=2,
        merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=QWEN3_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    # greedy (the real generation_config samples with T=0.7, top_p 0.8, top_k 20): benchmarks want determinism
    _write_qwen_generation_config(out, ids)


def build_gemma3(out: Path, spec: dict) -> None:
    from transformers import Gemma3Config, Gemma3ImageProcessor, Gemma3Processor

    tok = build_gemma3_tokenizer()
    t = dict(spec["text"])
    pattern = t.pop("sliding_window_pattern")
    factor = t.pop("rope_scaling_factor")
    n = t["num_hidden_layers"]
    text = {
        **t, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False,
        "attention_dropout": 0.0, "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "initializer_range": 0.02, "use_cache": True, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "layer_types": ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": factor, "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "dtype": "bfloat16",
    }
    config = Gemma3Config(
        text_config={**text, "sliding_window_pattern": pattern}, vision_config=spec["vision"],
        mm_tokens_per_image=spec["mm_tokens_per_image"],
        boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
        eos_token_id=[1, 106], initializer_range=0.02, architectures=["Gemma3ForConditionalGeneration"],
        dtype="bfloat16",
    )
    config.save_pretrained(out)
    # gemma-3-12b-it preprocessor_config.json values (no pan-and-scan: 256 tokens per image)
    image_processor = Gemma3ImageProcessor(
        size={"height": 896, "width": 896}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], resample=2,
        rescale_factor=1 / 255, do_resize=True, do_rescale=True, do_normalize=True)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=spec["mm_tokens_per_image"])
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    _write_json(out / "generation_config.json",
                {"do_sample": False, "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
                 "cache_implementation": "hybrid"})


def build_gemma4(out: Path, spec: dict) -> None:
    from transformers import (
        Gemma4AudioConfig,
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    tok = build_gemma4_tokenizer()
    text = {
        "vocab_size": GEMMA4_TOKENIZER_LEN, "vocab_size_per_layer_input": GEMMA4_TOKENIZER_LEN,
        "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "attention_bias": False,
        "attention_dropout": 0.0, "max_position_embeddings": 131072, "sliding_window": 512, "head_dim": 256,
        "use_bidirectional_attention": None, "attention_k_eq_v": False, "num_global_key_value_heads": None,
        "rope_parameters": GEMMA4_ROPE, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "tie_word_embeddings": True, "initializer_range": 0.02, "use_cache": True, "dtype": "bfloat16",
        **spec["text"],
    }
    assert text["layer_types"][-1] == "full_attention" and len(text["layer_types"]) == text["num_hidden_layers"]
    config = Gemma4Config(
        text_config=text, vision_config={**spec["vision"], "dtype": "bfloat16"},
        audio_config=Gemma4AudioConfig(dtype="bfloat16") if spec["audio"] else None,
        vision_soft_tokens_per_image=GEMMA4_SOFT_TOKENS, eos_token_id=[1, 106], initializer_range=0.02,
        architectures=["Gemma4ForConditionalGeneration"], dtype="bfloat16", tie_word_embeddings=True,
    )
    ids = {"image_token_id": "<|image|>", "boi_token_id": "<|image>", "eoi_token_id": "<image|>",
           "audio_token_id": "<|audio|>", "boa_token_id": "<|audio>", "video_token_id": "<|video|>"}
    for attr, t in ids.items():  # the config's defaults are the tokenizer's ids (the converter copies them over)
        assert getattr(config, attr) == tok.convert_tokens_to_ids(t), (attr, getattr(config, attr))
    config.save_pretrained(out)
    # the converter's processor: 280 soft tokens per image (max 2520 patches), 3x3 pooling, no normalization
    image_processor = Gemma4ImageProcessor(max_soft_tokens=GEMMA4_SOFT_TOKENS, pooling_kernel_size=3,
                                           patch_size=16, do_normalize=False)
    processor = Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=image_processor,
                                video_processor=Gemma4VideoProcessor(), tokenizer=tok,
                                image_seq_length=GEMMA4_SOFT_TOKENS, chat_template=GEMMA4_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    # greedy (the real generation_config samples at T 1.0, top_k 64, top_p 0.95); eos = <eos>, <turn|>,
    # <|tool_response> as the converter writes it for instruction-tuned checkpoints
    _write_json(out / "generation_config.json",
                {"do_sample": False, "bos_token_id": 2, "eos_token_id": [1, 106, 50], "pad_token_id": 0})


BUILDERS = {"qwen2_5_vl": build_qwen2_5_vl, "qwen3_vl": build_qwen3_vl, "gemma3": build_gemma3,
            "gemma4": build_gemma4}


def build(out: Path, family: str) -> Path:
    family = LEGACY_PRESETS.get(family, family)
    spec = FAMILIES[family]
    out.mkdir(parents=True, exist_ok=True)
    BUILDERS[spec["kind"]](out, spec)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--family", choices=sorted(FAMILIES))
    g.add_argument("--preset", choices=sorted(LEGACY_PRESETS), help="old name: 7b|3b|tiny = qwen2_5_vl_*")
    a = ap.parse_args()
    fam = a.family or LEGACY_PRESETS[a.preset or "7b"]
    path = build(a.out, fam)
    print("built", fam, "model files in", path, sorted(p.name for p in path.iterdir()))
