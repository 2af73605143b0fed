"""CPU check of a model directory written by build_model.py, with the sglang/transformers that will serve it.

For the directory: AutoConfig / AutoTokenizer / AutoProcessor load it; a chat with two images (480x480 and
800x600; for Qwen also a video given as 8 frames of 320x240) is rendered with the chat template the way
SGLang's OpenAI server does it (image_url parts -> {"type": "image"}), the HF processor expands it (Qwen and
Gemma 4 also get the video), and the
image/video token counts are compared with the counts each model's resize rule gives (Gemma 4: the
aspect-ratio-preserving resize to at most max_soft_tokens x pooling_kernel_size**2 patches, per image and per
video frame). Then SGLang's own path:
ModelConfig (architecture, multimodal on/off, context length), the processor SGLang loads, the conversation
template SGLang would pick from the path, and the SGLang multimodal processor for the architecture
(`process_mm_data_async`) on the same prompt and images.

usage: python verify_cpu.py MODEL_DIR [--family NAME] [--no-sglang]      (prints a JSON summary at the end)
Needs no GPU (SGLang's processors only run Python/PIL/torch CPU code). Video through SGLang: Qwen's path pins
memory (CUDA), so Qwen video is only checked through HF; Gemma 4's processor reads frames without pinning, so with
decord or torchcodec importable a 16-frame MJPEG AVI (written here with PIL; serve.py sends an MPEG-4 clip of the same
frames) plus one image goes through SGLang's processor as serve.py's video request does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SIZES = [(480, 480), (800, 600)]  # (width, height)


def make_image(w: int, h: int, seed: int = 0):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), (30 + seed * 40, 90, 160))
    d = ImageDraw.Draw(img)
    for i in range(0, min(w, h) // 2 - 10, 40):
        d.rectangle([i, i, w - i - 1, h - i - 1], outline=((i * 5) % 256, 200, (255 - i) % 256), width=6)
    return img


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def qwen_resize(h: int, w: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' qwen2_vl smart_resize."""
    h_bar, w_bar = round(h / factor) * factor, round(w / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        h_bar = max(factor, math.floor(h / beta / factor) * factor)
        w_bar = max(factor, math.floor(w / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        h_bar, w_bar = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return h_bar, w_bar


def gemma4_tokens(w: int, h: int, ip) -> int:
    """transformers' Gemma 4 rule: resize to the largest multiple of patch*kernel within the patch budget."""
    from transformers.models.gemma4.image_processing_gemma4 import get_aspect_ratio_preserving_size

    k, patch = ip.pooling_kernel_size, ip.patch_size
    th, tw = get_aspect_ratio_preserving_size(height=h, width=w, patch_size=patch,
                                              max_patches=ip.max_soft_tokens * k * k, pooling_kernel_size=k)
    return (th // patch) * (tw // patch) // (k * k)


def expected_image_tokens(kind: str, cfg, proc) -> list[int]:
    if kind == "gemma3":
        return [cfg.mm_tokens_per_image] * len(SIZES)
    if kind == "gemma4":
        return [gemma4_tokens(w, h, proc.image_processor) for w, h in SIZES]
    ip = proc.image_processor
    patch, merge = ip.patch_size, ip.merge_size
    size = ip.size
    mn = size["shortest_edge"] if "shortest_edge" in size else ip.min_pixels
    mx = size["longest_edge"] if "longest_edge" in size else ip.max_pixels
    out = []
    for w, h in SIZES:
        rh, rw = qwen_resize(h, w, patch * merge, mn, mx)
        out.append((rh // patch) * (rw // patch) // merge**2)
    return out


def kind_of(cfg) -> str:
    arch = cfg.architectures[0]
    return {"Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl", "Qwen3VLForConditionalGeneration": "qwen3_vl",
            "Gemma3ForConditionalGeneration": "gemma3", "Gemma4ForConditionalGeneration": "gemma4"}[arch]


def openai_messages(n_images: int, video: bool) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": f"img{i}"}} for i in range(n_images)]
    if video:
        parts.append({"type": "video_url", "video_url": {"url": "vid0"}})
    parts.append({"type": "text", "text": "Describe these."})
    return [{"role": "user", "content": parts}]


def sglang_template_messages(msgs: list[dict]) -> list[dict]:
    """What sglang's process_content_for_template_format gives the template for 'openai' content format."""
    from sglang.srt.parser.jinja_template_utils import process_content_for_template_format

    out = []
    for m in msgs:
        out.append(process_content_for_template_format(m, "openai", [], [], [], []))
    return out


def hf_check(model: Path, report: dict) -> tuple:
    import numpy as np
    import transformers
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    proc = AutoProcessor.from_pretrained(model)
    kind = kind_of(cfg)
    report.update(transformers=transformers.__version__, architecture=cfg.architectures[0], model_type=cfg.model_type,
                  processor=type(proc).__name__, image_processor=type(proc.image_processor).__name__,
                  tokenizer=type(tok).__name__, len_tokenizer=len(tok))
    tc = cfg.get_text_config()
    report["text_config"] = {k: getattr(tc, k, None) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
        "intermediate_size", "vocab_size", "sliding_window", "rope_parameters")}
    if kind in ("gemma3", "gemma4"):
        report["text_config"]["layer_types[:6]"] = tc.layer_types[:6]
    if kind == "gemma4":
        report["text_config"].update({k: getattr(tc, k) for k in (
            "global_head_dim", "num_kv_shared_layers", "hidden_size_per_layer_input", "use_double_wide_mlp",
            "final_logit_softcapping")})
    vc = cfg.vision_config
    report["vision_config"] = {k: getattr(vc, k) for k in (
        "depth", "num_hidden_layers", "hidden_size", "intermediate_size", "num_heads", "num_attention_heads",
        "patch_size", "image_size", "spatial_merge_size", "temporal_patch_size", "out_hidden_size",
        "deepstack_visual_indexes", "num_position_embeddings", "fullatt_block_indexes", "pooling_kernel_size",
        "head_dim", "num_key_value_heads") if hasattr(vc, k)}

    # special ids
    names = {"qwen2_5_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>",
                            "<|im_end|>", "<|endoftext|>"],
             "qwen3_vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>",
                          "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
             "gemma3": ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                        "<end_of_image>", "<image_soft_token>"],
             "gemma4": ["<bos>", "<eos>", "<pad>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
                        "<|video|>", "<|audio>", "<|audio|>", "<audio|>", "<|channel>", "<|think|>"]}[kind]
    report["special_ids"] = {n: tok.convert_tokens_to_ids(n) for n in names}
    if kind == "gemma3":
        report["config_ids"] = {"boi_token_index": cfg.boi_token_index, "eoi_token_index": cfg.eoi_token_index,
                                "image_token_index": cfg.image_token_index, "eos_token_id": cfg.eos_token_id}
        image_id = cfg.image_token_index
    elif kind == "gemma4":
        report["config_ids"] = {k: getattr(cfg, k) for k in ("image_token_id", "boi_token_id", "eoi_token_id",
                                                             "video_token_id", "audio_token_id", "boa_token_id",
                                                             "eoa_token_index", "eos_token_id")}
        image_id = cfg.image_token_id
    else:
        report["config_ids"] = {k: getattr(cfg, k) for k in ("image_token_id", "video_token_id",
                                                             "vision_start_token_id", "vision_end_token_id")}
        image_id = cfg.image_token_id

    images = [make_image(w, h, i) for i, (w, h) in enumerate(SIZES)]
    video = kind != "gemma3"
    msgs = sglang_template_messages(openai_messages(len(images), video))
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    report["prompt_rendered"] = prompt
    kw = {}
    frames = None
    if video:
        frames = np.stack([np.asarray(make_image(320, 240, k % 4)) for k in range(8)])  # T,H,W,C
        kw["videos"] = [frames]
        if kind in ("qwen3_vl", "gemma4"):
            from transformers.video_utils import VideoMetadata

            kw["video_metadata"] = [VideoMetadata(total_num_frames=8, fps=4.0, frames_indices=list(range(8)))]
            kw["do_sample_frames"] = False
    out = proc(text=[prompt], images=images, return_tensors="pt", **kw)
    ids = out["input_ids"][0].tolist()
    n_img = sum(1 for t in ids if t == image_id)
    exp = expected_image_tokens(kind, cfg, proc)
    report["hf"] = {"input_len": len(ids), "image_tokens": n_img, "expected_image_tokens": exp,
                    "image_ok": n_img == sum(exp), "pixel_values": list(out["pixel_values"].shape)}
    if "image_grid_thw" in out:
        grid = out["image_grid_thw"].tolist()
        report["hf"]["image_grid_thw"] = grid
        report["hf"]["image_tokens_per_image"] = [t * h * w // 4 for t, h, w in grid]
    if kind == "gemma3":
        report["hf"]["boi_count"] = ids.count(cfg.boi_token_index)
        report["hf"]["eoi_count"] = ids.count(cfg.eoi_token_index)
        report["hf"]["bos_at_start"] = ids[:3]
    if kind == "gemma4":
        report["hf"]["boi_count"] = ids.count(cfg.boi_token_id)
        report["hf"]["eoi_count"] = ids.count(cfg.eoi_token_id)
        report["hf"]["bos_at_start"] = ids[:3]
        report["hf"]["image_position_ids"] = list(out["image_position_ids"].shape)
        # per image: real (position != -1) patches / kernel**2, as the tower pools them
        k = proc.image_processor.pooling_kernel_size
        real = (out["image_position_ids"] != -1).any(dim=-1).sum(dim=-1).tolist()
        report["hf"]["image_tokens_per_image"] = [r // (k * k) for r in real]
        n_vid = ids.count(cfg.video_token_id)
        per_frame = gemma4_tokens(320, 240, proc.video_processor)
        report["hf"].update(pixel_values_videos=list(out["pixel_values_videos"].shape), video_tokens=n_vid,
                            expected_video_tokens=per_frame * frames.shape[0], video_tokens_per_frame=per_frame,
                            video_ok=n_vid == per_frame * frames.shape[0])
    elif video:
        vgrid = out["video_grid_thw"].tolist()
        n_vid = sum(1 for t in ids if t == cfg.video_token_id)
        t, h, w = vgrid[0]
        report["hf"].update(video_grid_thw=vgrid, video_tokens=n_vid, expected_video_tokens=t * h * w // 4,
                            video_ok=n_vid == t * h * w // 4,
                            vision_start_count=ids.count(cfg.vision_start_token_id))
    print(json.dumps({k: v for k, v in report.items() if k != "prompt_rendered"}, indent=1, default=str))
    print("rendered prompt:", repr(prompt))
    return cfg, tok, proc, kind, images, exp, prompt


def sglang_check(model: Path, report: dict, kind: str, images, exp: list[int]) -> None:
    import sglang
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.managers.multimodal_processor import get_mm_processor, import_processors
    from sglang.srt.managers.tokenizer_manager import _determine_tensor_transport_mode, _get_processor_wrapper
    from sglang.srt.parser.conversation import get_conv_template_by_model_path
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_tokenizer

    sg = report.setdefault("sglang", {"version": sglang.__version__})
    # Gemma4 asserts a triton/trtllm_mha attention backend in ServerArgs (nothing runs a kernel here)
    attention = "triton" if kind == "gemma4" else "torch_native"
    args = ServerArgs(model_path=str(model), load_format="dummy", device="cpu", enable_multimodal=True,
                      skip_server_warmup=True, attention_backend=attention, mm_attention_backend="sdpa")
    sg["conv_template_from_path"] = get_conv_template_by_model_path(str(model))
    mc = ModelConfig.from_server_args(args)
    sg["model_config"] = {"is_multimodal": mc.is_multimodal, "context_len": mc.context_len,
                          "num_hidden_layers": mc.num_hidden_layers, "hidden_size": mc.hidden_size,
                          "head_dim": mc.head_dim, "num_kv_heads": mc.get_total_num_kv_heads(),
                          "vocab_size": mc.vocab_size, "is_hybrid_swa": getattr(mc, "is_hybrid_swa", None),
                          "attention_arch": str(mc.attention_arch)}
    if sg["model_config"]["is_hybrid_swa"]:
        sg["model_config"].update(swa_layers=len(mc.swa_attention_layer_ids),
                                  full_layers=len(mc.full_attention_layer_ids),
                                  swa_head_dim=getattr(mc, "swa_head_dim", None),
                                  swa_num_kv_heads=mc.get_swa_num_kv_heads(1) if hasattr(mc, "get_swa_num_kv_heads")
                                  else None, v_head_dim=getattr(mc, "v_head_dim", None),
                                  sliding_window=getattr(mc, "sliding_window_size", None),
                                  disable_hybrid_swa_memory=args.disable_hybrid_swa_memory)
    # without --enable-multimodal (what the server decides by default)
    args_default = ServerArgs(model_path=str(model), load_format="dummy", device="cpu", skip_server_warmup=True,
                              **({"attention_backend": attention} if kind == "gemma4" else {}))
    sg["is_multimodal_without_flag"] = ModelConfig.from_server_args(args_default).is_multimodal

    set_global_server_args_for_tokenizer(args)  # as TokenizerManager.__init__ does
    # On a GPU server SGLang runs the (fast) HF image processor on cuda:{base_gpu_id} in the tokenizer-manager
    # process; here there is no GPU, so take the branch SGLang takes on a CPU engine.
    import sglang.srt.multimodal.processors.base_processor as bp

    bp._is_cpu = True
    import_processors("sglang.srt.multimodal.processors")
    processor = _get_processor_wrapper(args)
    sg["processor"] = type(processor).__name__
    mm = get_mm_processor(mc.hf_config, args, processor, _determine_tensor_transport_mode(args), model_config=mc)
    sg["mm_processor"] = type(mm).__name__

    # the OpenAI server path: render -> encode -> decode -> mm processor
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer_from_processor

    tok = get_tokenizer_from_processor(processor)
    msgs = sglang_template_messages(openai_messages(len(images), False))
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, return_dict=False)
    auto_adds = len(tok.encode("")) > 0
    ids = tok.encode(rendered, **({"add_special_tokens": False} if auto_adds else {}))
    prompt = tok.decode(ids)
    urls = [data_url(im) for im in images]
    req = GenerateReqInput(text=prompt, image_data=urls, rid="verify-0")
    res = asyncio.run(mm.process_mm_data_async(image_data=urls, input_text=prompt, request_obj=req))
    out_ids = list(res.input_ids)
    image_id = mc.hf_config.image_token_index if kind == "gemma3" else mc.hf_config.image_token_id
    items = [it for it in res.mm_items]
    offsets = [list(map(list, getattr(it, "offsets", []) or [])) for it in items]
    per_image = [e - s + 1 for it in offsets for s, e in it]
    sg["mm"] = {"input_len": len(out_ids), "image_tokens": out_ids.count(image_id), "expected": exp,
                "ok": out_ids.count(image_id) == sum(exp), "mm_items": len(items),
                "modalities": [str(it.modality) for it in items], "offsets": offsets,
                "tokens_per_image_from_offsets": per_image,
                "feature_shapes": [list(getattr(it, "feature", None).shape) if getattr(it, "feature", None) is not None
                                   else None for it in items],
                "tokenizer_auto_adds_specials": auto_adds, "first_ids": out_ids[:4]}
    if getattr(res, "mrope_positions", None) is not None:
        sg["mm"]["mrope_positions"] = list(res.mrope_positions.shape)
        sg["mm"]["mrope_position_delta"] = res.mrope_position_delta.flatten().tolist()
    if kind == "gemma4":
        sg["video_ok"] = sglang_video_check(mm, mc, tok, sg)
    print(json.dumps(sg, indent=1, default=str))


def mjpeg_avi(frames: list, fps: float) -> bytes:
    """A minimal MJPEG AVI (RIFF, one video stream, idx1) from HxWx3 uint8 frames: what ffmpeg/decord can read,
    without cv2/av here."""
    import struct

    from PIL import Image

    def chunk(fcc: bytes, data: bytes) -> bytes:
        return fcc + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def lst(kind: bytes, body: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(body) + 4) + kind + body

    h, w = frames[0].shape[:2]
    jpgs = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    n, big = len(jpgs), max(map(len, jpgs))
    avih = struct.pack("<14I", int(1e6 / fps), big * int(fps), 0, 0x10, n, 0, 1, big, w, h, 0, 0, 0, 0)
    strh = b"vidsMJPG" + struct.pack("<IHHIIIIIIIIhhhh", 0, 0, 0, 0, 1, int(fps), 0, n, big, 0xFFFFFFFF, 0,
                                     0, 0, w, h)
    strf = struct.pack("<IiiHH4sIiiII", 40, w, h, 1, 24, b"MJPG", w * h * 3, 0, 0, 0, 0)
    movi, idx, off = b"", b"", 4
    for j in jpgs:
        c = chunk(b"00dc", j)
        idx += b"00dc" + struct.pack("<III", 0x10, off, len(j))
        movi, off = movi + c, off + len(c)
    body = (b"AVI " + lst(b"hdrl", chunk(b"avih", avih) + lst(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf)))
            + lst(b"movi", movi) + chunk(b"idx1", idx))
    return b"RIFF" + struct.pack("<I", len(body)) + body


def gradient_frames(size: tuple[int, int], n: int, seed: int) -> list:
    """serve.py's mp4_b64 frames: smooth moving gradients."""
    import numpy as np

    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    return [np.stack([(xs * 3 + (seed + i) * 7) % 256, (ys * 2 + (seed + i) * 11) % 256,
                      ((xs + ys) + (seed + i) * 5) % 256], axis=-1).astype(np.uint8) for i in range(n)]


def sglang_video_check(mm, mc, tok, sg: dict) -> bool:
    """Gemma 4 only: serve.py's video request (16 frames 320x240 at 4 fps + one 480x480 image) through SGLang."""
    import importlib.util

    from sglang.srt.managers.io_struct import GenerateReqInput

    if not any(importlib.util.find_spec(m) for m in ("torchcodec", "decord")):
        sg["video"] = "skipped: neither torchcodec nor decord importable"
        return True
    vurl = "data:video/avi;base64," + base64.b64encode(mjpeg_avi(gradient_frames((320, 240), 16, 3), 4.0)).decode()
    iurl = data_url(make_image(480, 480, 0))
    msg = {"role": "user", "content": [{"type": "video_url", "video_url": {"url": vurl}},
                                       {"type": "image_url", "image_url": {"url": iurl}},
                                       {"type": "text", "text": "What happens in the clip?"}]}
    rendered = tok.apply_chat_template(sglang_template_messages([msg]), tokenize=False, add_generation_prompt=True,
                                       return_dict=False)
    prompt = tok.decode(tok.encode(rendered))
    req = GenerateReqInput(text=prompt, image_data=[iurl], video_data=[vurl], rid="verify-video")
    res = asyncio.run(mm.process_mm_data_async(image_data=[iurl], input_text=prompt, request_obj=req))
    ids, cfg = list(res.input_ids), mc.hf_config
    per_frame = gemma4_tokens(320, 240, mm._processor.video_processor)
    videos = [it for it in res.mm_items if it.is_video()]
    sg["video"] = {"input_len": len(ids), "video_tokens": ids.count(cfg.video_token_id),
                   "expected_video_tokens": 16 * per_frame, "image_tokens": ids.count(cfg.image_token_id),
                   "frames_from_offsets": sum(len(it.offsets) for it in videos),
                   "feature_shapes": [list(it.feature.shape) for it in res.mm_items],
                   "keys": [sorted(it.model_specific_data) for it in res.mm_items]}
    return ids.count(cfg.video_token_id) == 16 * per_frame and ids.count(cfg.image_token_id) == gemma4_tokens(
        480, 480, mm._processor.image_processor)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--no-sglang", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    a = ap.parse_args()
    report: dict = {"model": str(a.model)}
    _cfg, _tok, _proc, kind, images, exp, _ = hf_check(a.model, report)
    ok = report["hf"]["image_ok"] and report["hf"].get("video_ok", True)
    if not a.no_sglang:
        sglang_check(a.model, report, kind, images, exp)
        ok = ok and report["sglang"]["mm"]["ok"] and report["sglang"].get("video_ok", True)
    report["ok"] = bool(ok)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1, default=str))
    print("RESULT", "OK" if ok else "MISMATCH", a.model)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
