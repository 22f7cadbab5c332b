"""cascade caption: a folder of videos recaptioned by a local (tiny, random) captioner into a
resumable JSONL of new + original captions, and training mixing the two at a set ratio."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade.caption import Captioner, caption_folder
from cascade.cli import main
from cascade.data.video_folder import VideoFolder
from cascade.video_io import write_mp4

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    """A tiny random ViT encoder + GPT-2 decoder (VisionEncoderDecoder) with the packaged MiniLM
    tokenizer, saved with save_pretrained and loaded back by path."""
    from transformers import (AutoTokenizer, GPT2Config, ViTConfig, ViTImageProcessor,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)
    from cascade.text import minilm_path
    root = tmp_path_factory.mktemp("captioner")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    enc = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=64)
    dec = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                     add_cross_attention=True, is_decoder=True, bos_token_id=tok.cls_token_id,
                     eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec))
    model.config.decoder_start_token_id = tok.cls_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.sep_token_id
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.save_pretrained(root)
    tok.save_pretrained(root)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    return root


@pytest.fixture
def videos(tmp_path):
    """Three 8-frame clips of 16x16 (one in a subfolder) and a JSONL manifest of their captions."""
    rows = []
    for k, name in enumerate(["a.mp4", "b.mp4", "sub/c.mp4"]):
        frames = np.zeros((8, 16, 16, 3), np.uint8)
        frames[..., k] = np.linspace(0, 255, 8, dtype=np.uint8)[:, None, None]    # fades in
        write_mp4(frames, tmp_path / "vids" / name, fps=8)
        rows.append({"path": name, "caption": f"original {k}"})
    (tmp_path / "vids" / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "vids"


def read_rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_caption_folder_writes_new_beside_original_and_resumes(captioner, videos, capsys):
    out = caption_folder(videos, str(captioner), frames=3, batch_size=2, progress=False)
    assert out == videos / "captions_recaptioned.jsonl"
    rows = read_rows(out)
    assert [r["path"] for r in rows] == ["a.mp4", "b.mp4", "sub/c.mp4"]
    assert [r["original_caption"] for r in rows] == ["original 0", "original 1", "original 2"]
    assert all(isinstance(r["caption"], str) and r["caption"].strip() for r in rows)
    # batching does not change a clip's caption (greedy decoding of the same frames)
    one = Captioner(str(captioner))
    from cascade.caption import clip_frames, join_captions
    assert rows[1]["caption"] == join_captions(one(clip_frames(videos / "b.mp4", 3)))
    # killed mid-write: the last row cut short; the rerun drops it and captions only that clip
    text = out.read_text()
    out.write_text(text[:text.rindex("{") + 10])
    capsys.readouterr()
    caption_folder(videos, str(captioner), frames=3, batch_size=2, progress=False)
    assert "2 of 3 clips already in" in capsys.readouterr().out
    assert read_rows(out) == rows


def test_cli_caption_tile_mode_and_a_missing_captioner(captioner, videos, tmp_path, capsys):
    out = tmp_path / "tiled.jsonl"
    rc = main(["caption", str(videos), "--model", str(captioner), "--mode", "tile", "--frames", "2",
               "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert len(read_rows(out)) == 3
    capsys.readouterr()
    rc = main(["caption", str(videos), "--model", str(tmp_path / "no_such_model"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert len(err.splitlines()) == 1 and "no_such_model" in err and "does not exist" in err
    rc = main(["caption", str(videos), "--no-progress"])
    assert rc == 2 and "--model" in capsys.readouterr().err


def test_training_mixes_recaptions_at_the_ratio_by_seed_and_index(videos):
    recap = videos / "recaptions.jsonl"
    recap.write_text("".join(json.dumps({"path": p, "caption": f"new {p}", "original_caption": None}) + "\n"
                             for p in ("a.mp4", "b.mp4", "sub/c.mp4")))
    kw = dict(frames=2, height=16, width=16, fps=8, seed=3, recaption_manifest="recaptions.jsonl")
    half = VideoFolder(videos, "captions.jsonl", recaption_ratio=0.5, **kw)
    picks = [half[i]["meta"]["recaptioned"] for i in range(40)]
    assert 10 <= sum(picks) <= 30                                   # about half
    again = VideoFolder(videos, "captions.jsonl", recaption_ratio=0.5, **kw)
    assert [again[i]["caption"] for i in range(40)] == [half[i]["caption"] for i in range(40)]
    for i in range(40):
        s = half[i]
        path = str(Path(s["meta"]["path"]).relative_to(videos))
        original = f"original {['a.mp4', 'b.mp4', 'sub/c.mp4'].index(path)}"
        assert s["caption"] == (f"new {path}" if picks[i] else original)
    assert all(VideoFolder(videos, "captions.jsonl", recaption_ratio=1.0, **kw)[i]["meta"]["recaptioned"]
               for i in range(6))
    from cascade.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="data.recaption_ratio"):
        load_config(None, ["data.recaption_ratio=1.5"])


def test_a_blip_captioner_works_too(videos, tmp_path):
    """An AutoModelForImageTextToText model with its processor (a tiny random BLIP)."""
    from transformers import (AutoTokenizer, BlipConfig, BlipForConditionalGeneration,
                              BlipImageProcessor, BlipProcessor)
    from cascade.text import minilm_path
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    cfg = BlipConfig(vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32,
                     text_config=dict(vocab_size=len(tok), encoder_hidden_size=32, **small,
                                      bos_token_id=tok.cls_token_id, pad_token_id=tok.pad_token_id,
                                      sep_token_id=tok.sep_token_id, eos_token_id=tok.sep_token_id))
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(tmp_path / "blip")
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tok).save_pretrained(tmp_path / "blip")
    out = caption_folder(videos, str(tmp_path / "blip"), frames=2, mode="tile", max_new_tokens=8,
                         out=tmp_path / "blip.jsonl", progress=False)
    rows = read_rows(out)
    assert len(rows) == 3 and all(r["caption"].strip() for r in rows)
