"""`cascade caption <folder>`: recaption a folder of videos with a local captioning model.

DALL-E 3 (Betker et al. 2023, Sec. 3) shows that a text-to-image model follows prompts far better
when trained on descriptive synthetic captions from a captioner than on the alt-text that came
with the images (LLaVA-style vision-language models are such captioners). This writes a manifest
of new captions for every video of a folder:

    {"path": "clips/a.mp4", "caption": <new>, "original_caption": <the manifest's, or null>}

one JSON line per clip, paths relative to the folder (the form VideoFolder reads). Training mixes
them with the originals at a set ratio: data.recaption_manifest=<this file>
data.recaption_ratio=0.95 (DALL-E 3's 95:5), decided per sample by (seed, index).

The model: any local transformers image-to-text model (a VisionEncoderDecoder such as ViT-GPT2, or
an AutoModelForImageTextToText such as BLIP / LLaVA), by folder or by a hub name already in the
local cache (local_files_only: nothing is downloaded). A few frames per clip (--frames, spread
evenly from the first to the last) are captioned either one by one and joined ("frames": distinct
captions in order, joined with "; then "), or tiled side by side into one image ("tile").

Batched (--batch-size clips per generate call), with a progress bar, and resumable: each batch's
rows are appended as they are made, and a rerun skips the clips already in the output (a line a
kill cut short is dropped first). A clip that cannot be decoded is skipped with a warning and
gets no row (a rerun tries it again).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".gif")
DEFAULT_OUT = "captions_recaptioned.jsonl"
JOIN = "; then "
VLM_PROMPT = "Describe this video frame in one detailed sentence."


def clip_frames(path: str | Path, k: int) -> list[np.ndarray]:
    """k frames (uint8 (H, W, 3)) spread evenly over the video, first and last included."""
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError("no frames decoded")
    picks = np.linspace(0, len(frames) - 1, k).round().astype(int) if k > 1 else [len(frames) // 2]
    return [frames[i] for i in picks]


def tile(frames: list[np.ndarray]) -> np.ndarray:
    """Frames side by side, left to right in time: (H, k*W, 3)."""
    return np.concatenate(frames, axis=1)


def join_captions(captions: list[str]) -> str:
    """Per-frame captions -> one: the distinct ones in order (a static clip keeps one)."""
    distinct = list(dict.fromkeys(c.strip() for c in captions if c.strip()))
    return JOIN.join(distinct)


class Captioner:
    """A local image-to-text model: list of RGB images -> list of captions (greedy, batched)."""

    def __init__(self, name_or_path: str, device="cpu", max_new_tokens: int = 30,
                 prompt: str = VLM_PROMPT):
        from transformers import AutoConfig
        p = Path(name_or_path).expanduser()
        # a hub name is "org/name"; anything else with a path's look is a folder that must exist
        looks_local = p.exists() or p.is_absolute() or name_or_path.startswith((".", "~")) \
            or name_or_path.count("/") > 1
        if looks_local and not p.is_dir():
            raise FileNotFoundError(f"--model: captioner {name_or_path} does not exist (a folder of "
                                    f"a transformers image-to-text model is needed)")
        src = str(p) if looks_local else name_or_path
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=True)
            if config.model_type == "vision-encoder-decoder":
                from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel
                self.model = VisionEncoderDecoderModel.from_pretrained(src, local_files_only=True)
                self.image_processor = AutoImageProcessor.from_pretrained(src, local_files_only=True)
                self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
                self.processor = None
            else:
                from transformers import AutoModelForImageTextToText, AutoProcessor
                self.model = AutoModelForImageTextToText.from_pretrained(src, local_files_only=True)
                self.processor = AutoProcessor.from_pretrained(src, local_files_only=True)
                self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        except (OSError, ValueError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = "cannot be loaded" if looks_local else \
                "is not a local folder nor in the local Hugging Face cache"
            raise FileNotFoundError(f"--model: captioner '{name_or_path}' {where} (nothing is "
                                    f"downloaded at run time): {first}") from None
        self.model.eval().requires_grad_(False).to(device)
        self.device, self.max_new_tokens, self.prompt = device, max_new_tokens, prompt
        self.name = name_or_path

    def _inputs(self, images: list[np.ndarray]) -> dict:
        if self.processor is None:
            return {"pixel_values": self.image_processor(images=images, return_tensors="pt")["pixel_values"]}
        proc = self.processor
        if getattr(proc, "chat_template", None):             # a chat VLM (LLaVA, ...): ask it
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            text = proc.apply_chat_template(msgs, add_generation_prompt=True)
            return dict(proc(images=images, text=[text] * len(images), return_tensors="pt", padding=True))
        return dict(proc(images=images, return_tensors="pt"))  # BLIP & co: unconditional captions

    def __call__(self, images: list[np.ndarray]) -> list[str]:
        import torch
        inputs = {k: v.to(self.device) for k, v in self._inputs(images).items()}
        kw = dict(max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1)
        with torch.no_grad():
            try:
                ids = self.model.generate(**inputs, **kw, pad_token_id=self.tokenizer.pad_token_id)
            except TypeError as e:                   # BLIP's generate sets pad_token_id itself
                if "pad_token_id" not in str(e):
                    raise
                ids = self.model.generate(**inputs, **kw)
        if "input_ids" in inputs and not self.model.config.is_encoder_decoder:
            ids = ids[:, inputs["input_ids"].shape[1]:]       # a decoder-only VLM echoes its prompt
        return [" ".join(t.split()) for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def folder_clips(folder: Path, manifest: str | Path | None) -> list[dict]:
    """The clips to caption: the manifest's rows (given, or captions.jsonl / captions.csv in the
    folder) as {"path": relative str, "original_caption": str | None}; else every video file
    under the folder, without an original caption."""
    from cascade.data.video_folder import check_inside, read_manifest
    if manifest is None:
        found = [folder / n for n in ("captions.jsonl", "captions.csv") if (folder / n).is_file()]
        manifest = found[0] if found else None
    elif not Path(manifest).is_file() and (folder / manifest).is_file():
        manifest = folder / manifest
    if manifest is not None:
        rows = read_manifest(manifest)
        for r in rows:
            check_inside(folder, r["path"], r["row"])
        return [{"path": r["path"], "original_caption": r["caption"]} for r in rows]
    return [{"path": str(p.relative_to(folder)), "original_caption": None}
            for p in sorted(folder.rglob("*")) if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()]


def read_done(out: Path) -> list[dict]:
    """The rows of an earlier (maybe killed) run; a line cut short or not a row is dropped and
    the file rewritten without it, so appending continues on a clean line."""
    if not out.is_file():
        return []
    rows, bad = [], 0
    for line in out.read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict) and isinstance(r.get("path"), str) and isinstance(r.get("caption"), str):
            rows.append(r)
        else:
            bad += 1
    if bad or (out.stat().st_size and not out.read_bytes().endswith(b"\n")):
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        tmp.replace(out)
    return rows


def caption_folder(folder: str | Path, model: str | None, frames: int = 3, batch_size: int = 4,
                   out: str | Path | None = None, manifest: str | Path | None = None,
                   mode: str = "frames", max_new_tokens: int = 30, device=None,
                   progress: bool = True) -> Path:
    """Caption every clip of `folder` into the JSONL `out` (module docstring); returns its path."""
    import torch
    from tqdm import tqdm
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"cascade caption: video folder not found: {folder}")
    if not model:
        raise ValueError("cascade caption: pass --model PATH, a local transformers image-to-text "
                         "model folder (e.g. a ViT-GPT2 or BLIP captioner) or a cached hub name")
    if frames < 1 or batch_size < 1:
        raise ValueError(f"cascade caption: --frames and --batch-size must be positive, got "
                         f"{frames} and {batch_size}")
    if mode not in ("frames", "tile"):
        raise ValueError(f"--mode: '{mode}' is not one of frames, tile")
    out = Path(out) if out else folder / DEFAULT_OUT
    clips = folder_clips(folder, manifest)
    if not clips:
        raise ValueError(f"cascade caption: no videos in {folder} ({', '.join(VIDEO_SUFFIXES)})")
    done = {os.path.normpath(r["path"]) for r in read_done(out)}
    todo = [c for c in clips if os.path.normpath(c["path"]) not in done]
    captioner = Captioner(model, device or ("cuda" if torch.cuda.is_available() else "cpu"),
                          max_new_tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    if done:
        print(f"caption: {len(clips) - len(todo)} of {len(clips)} clips already in {out}: skipped")
    bar = tqdm(total=len(clips), initial=len(clips) - len(todo), desc="caption", unit="clip",
               disable=not progress, dynamic_ncols=True)
    failed = 0
    for s in range(0, len(todo), batch_size):
        batch, images = [], []
        for c in todo[s:s + batch_size]:
            try:
                fr = clip_frames(folder / c["path"], frames)
            except Exception as e:                                      # unreadable: no row
                failed += 1
                why = (str(e).splitlines() or [type(e).__name__])[0]
                log.warning("caption: skipping %s: %s", c["path"], why)
                bar.update(1)
                continue
            batch.append(c)
            images += [tile(fr)] if mode == "tile" else fr
        if not batch:
            continue
        texts = captioner(images)
        per = 1 if mode == "tile" else frames
        with open(out, "a", encoding="utf-8") as f:
            for i, c in enumerate(batch):
                new = join_captions(texts[i * per:(i + 1) * per]) or (c["original_caption"] or "")
                f.write(json.dumps({"path": c["path"], "caption": new,
                                    "original_caption": c["original_caption"]}) + "\n")
        bar.update(len(batch))
    bar.close()
    print(f"caption: wrote {len(todo) - failed} caption(s) with {captioner.name} to {out}"
          + (f"; {failed} unreadable clip(s) skipped" if failed else ""))
    return out
