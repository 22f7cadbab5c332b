"""LoRA adapters (cascade/adapters.py): training only the adapters through the DeepSpeed trainer,
the PEFT-format export that plain PEFT loads, merging, exact resume, 2 ranks against 1, and the
one-line refusals of an adapter for another stage, architecture or base export."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cascade.config import load_config
from tests.test_stages_cascade import TINY_BASE, assets, stage_cfg  # noqa: F401  (module fixture)
from tests.test_train import assert_trained_close, clean_env, read_log

REPO = Path(__file__).resolve().parents[1]
LORA = ["train.lora.rank=4", "train.lora.alpha=8"]
pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def base_export(assets, tmp_path_factory):  # noqa: F811
    """A tiny base trained 6 steps: the export the adapters adapt."""
    from cascade.train import train
    out = tmp_path_factory.mktemp("base")
    return train(stage_cfg("base", assets, ["train.steps=6", f"train.out_dir={out}"]), progress=False)


def lora_cfg(assets, base_export, out, extra=()):  # noqa: F811
    return stage_cfg("base", assets, [*LORA, f"train.init_from={base_export}", f"train.out_dir={out}",
                                      "train.ckpt_every=3", "train.ema_decay=0.5", "train.schedule=constant",
                                      *extra])


@pytest.fixture(scope="module")
def adapter(assets, base_export, tmp_path_factory):  # noqa: F811
    from cascade.train import train
    out = tmp_path_factory.mktemp("lora")
    return train(lora_cfg(assets, base_export, out, ["train.steps=6"]), progress=False)


def test_only_the_adapters_train_and_plain_peft_loads_them(assets, base_export, adapter):  # noqa: F811
    from peft import PeftModel

    from cascade.adapters import merge, read_adapter
    from cascade.models.dit import VideoDiT
    from cascade.stages import load_export
    names = sorted(p.name for p in adapter.iterdir())
    assert names == ["SHA256SUMS", "adapter_config.json", "adapter_model.safetensors",
                     "cascade_adapter.json"]
    cfg, base = load_export(base_export)
    meta, config, tensors = read_adapter(adapter, cfg, base_export)
    assert meta["stage"] == "base" and config["r"] == 4 and config["peft_type"] == "LORA"
    assert all(k.startswith("base_model.model.") and k.split(".")[-3] in ("qkv", "proj", "q", "kv")
               for k in tensors)                                         # the attention projections
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)   # B left zero init
    merged = merge(base, config, tensors)
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed and all(k.rsplit(".", 2)[-2] in ("qkv", "proj", "q", "kv") for k in changed)
    assert merge(base, config, tensors, scale=0.0).keys() == base.keys()
    # plain PEFT: the same outputs as the merged weights
    torch.manual_seed(0)
    x, t = torch.randn(2, cfg.dit.in_channels, 4, 8, 8), torch.tensor([0.3, 0.7])
    c = {"text": torch.randn(2, 5, 32), "text_mask": torch.ones(2, 5, dtype=torch.bool),
         "pooled": torch.randn(2, 32)}
    ours = VideoDiT(cfg.dit)
    ours.load_state_dict(merged)
    theirs = VideoDiT(cfg.dit)
    theirs.load_state_dict(base)
    theirs = PeftModel.from_pretrained(theirs, str(adapter)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, t, c), ours.eval()(x, t, c), atol=1e-5, rtol=1e-4)


def test_adapter_refused_for_another_stage_architecture_or_base(assets, base_export, adapter, tmp_path):  # noqa: F811
    import shutil

    from cascade.adapters import read_adapter
    from cascade.checksums import write_checksums
    from cascade.stages import load_export
    cfg, _ = load_export(base_export)
    other = load_config(REPO / "configs/tiny/base.yaml", [*TINY_BASE, "dit.depth=2"])
    with pytest.raises(ValueError, match="another dit architecture.*depth"):
        read_adapter(adapter, other, "elsewhere")
    interp = load_config(REPO / "configs/tiny/interp.yaml")
    with pytest.raises(ValueError, match="is for the 'base' stage, not the 'interp'"):
        read_adapter(adapter, interp, "runs/interp")
    copy = Path(shutil.copytree(base_export, tmp_path / "base2"))
    state = load_file(str(copy / "model.safetensors"))
    state["final.linear.bias"] += 1
    from safetensors.torch import save_file
    save_file(state, str(copy / "model.safetensors"))
    write_checksums(copy)
    with pytest.raises(ValueError, match=r"was trained on .* not on .*base2"):
        read_adapter(adapter, cfg, copy)


def test_lora_resume_equals_the_uninterrupted_run(assets, base_export, adapter, tmp_path):  # noqa: F811
    """Stopped at step 3 (its checkpoint), then resumed to 6: the same adapter as the run that
    went on (one machine, one process layout)."""
    from cascade.train import train
    train(lora_cfg(assets, base_export, tmp_path, ["train.steps=3"]), progress=False)
    again = train(lora_cfg(assets, base_export, tmp_path, ["train.steps=6"]), progress=False)
    a, b = load_file(str(adapter / "adapter_model.safetensors")), load_file(str(again / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    assert [r["step"] for r in read_log(tmp_path / "log.csv")] == list(range(1, 7))


def test_two_ranks_give_the_adapter_of_one(assets, base_export, adapter, tmp_path):  # noqa: F811
    """deepspeed launcher, 2 gloo ranks x batch 2 with ZeRO-2 against 1 process x batch 4."""
    launcher = Path(sys.executable).with_name("deepspeed")
    args = [*TINY_BASE, f"text.encoder={assets / 'text'}", f"train.vae_dir={assets / 'vae'}", *LORA,
            f"train.init_from={base_export}", "train.ckpt_every=3", "train.ema_decay=0.5",
            "train.steps=6", "train.batch_size=2", "train.zero_stage=2", "train.schedule=constant",
            f"train.out_dir={tmp_path}"]
    r = subprocess.run([str(launcher), "--num_gpus", "2", "--no_local_rank", "--master_port",
                        str(31500 + os.getpid() % 1000), "--module", "cascade.cli", "train",
                        str(REPO / "configs/tiny/base.yaml"), *args, "--no-progress"],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert_trained_close(load_file(str(adapter / "adapter_model.safetensors")),
                         load_file(str(tmp_path / "export" / "adapter_model.safetensors")), lr=2e-3)


def test_lora_config_errors(assets):  # noqa: F811
    from cascade.config import ConfigError
    with pytest.raises(ConfigError, match="set train.init_from"):
        stage_cfg("base", assets, LORA)
    with pytest.raises(ConfigError, match="not the vae"):
        load_config(REPO / "configs/tiny/vae.yaml", [*LORA, "train.init_from=x"])


from tests.test_conditions import cascade_dir  # noqa: E402,F401  (module fixture)
from tests.test_pipeline import full, stages  # noqa: E402,F401


def test_tune_then_edit_a_rendered_clip(cascade_dir, tmp_path, capsys):  # noqa: F811
    """cascade tune (one-shot LoRA on the base) then cascade edit (DDIM inversion with the
    recorded caption, the edited prompt, through interp, VAE and SR), and SDEdit; tiny random
    stages, a rendered clip."""
    import json

    from cascade.cli import main
    from cascade.evaluate_tasks import truth
    from cascade.video_io import read_video, write_mp4
    caption = "a red circle moving left on a blue background"
    clip = tmp_path / "clip.mp4"
    write_mp4(truth(caption, 13, 32, 32, 2.0, 0, 0), clip, fps=16)
    adapter = tmp_path / "adapter"
    rc = main(["tune", str(clip), caption, "--out", str(adapter), "--stages", str(cascade_dir),
               "--steps", "3", "--rank", "2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((adapter / "cascade_adapter.json").read_text())
    assert meta["tuned_on"]["caption"] == caption and meta["stage"] == "base" and meta["rank"] == 2
    out = tmp_path / "edits"
    for extra in (["--adapter", str(adapter)], ["--inversion", "none", "--strength", "0.5"]):
        rc = main(["edit", str(clip), "a green circle moving left on a blue background", "--stages",
                   str(cascade_dir), "--out", str(out), "--steps", "2", "--no-progress", *extra])
        assert rc == 0, capsys.readouterr().err
        frames, _ = read_video(next(out.glob("edit_*.mp4")))
        assert frames.shape == (7, 32, 32, 3)
    assert next(out.glob("edit_*.png")).is_file()
    capsys.readouterr()
    assert main(["edit", str(clip), "a green square", "--stages", str(cascade_dir), "--out", str(out),
                 "--steps", "1", "--no-progress"]) == 2                  # ddim without a caption
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the input video's own caption" in err[0]
    assert main(["edit", str(clip), "a green square", "--stages", str(cascade_dir), "--out", str(out),
                 "--inversion", "none", "--inject", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--inject: attention injection needs --inversion ddim" in err[0]
