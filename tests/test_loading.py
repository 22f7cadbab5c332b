"""Loading exported stages: a truncated or random-bytes weights file, a config of another
architecture or stage, a missing stage and a weights file changed since its export (checksum)
each end in one line naming the file; the shipped weights match their checksums."""
import json
import os
import re
import struct
from pathlib import Path

import pytest
import torch

from cascade.checksums import CHECKSUMS, ChecksumError, verify_checksums, write_checksums
from cascade.config import ConfigError, load_config, save_config
from cascade.stages import load_export, read_safetensors

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.frames=4", "data.height=16", "data.width=16", "vae.channels=8", "vae.channel_mults=[1,2]",
        "vae.temporal_down=[false]", "vae.groups=4", "vae.latent_channels=4"]

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    return msg


@pytest.fixture(scope="module")
def vae_export(tmp_path_factory):
    """A tiny random VAE exported the way cascade train exports (config, weights, SHA256SUMS)."""
    from cascade.models.vae import VideoVAE
    from cascade.train import export
    cfg = load_config(REPO / "configs/tiny/vae.yaml", TINY)
    torch.manual_seed(0)
    return export(cfg, VideoVAE(cfg.vae).state_dict(), tmp_path_factory.mktemp("exp") / "vae")


@pytest.fixture
def export_copy(vae_export, tmp_path):
    import shutil
    return Path(shutil.copytree(vae_export, tmp_path / "vae"))


def tensor_data_offset(path: Path) -> int:
    """Where a safetensors file's tensor bytes begin: 8 bytes of header length, then the header."""
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def test_export_records_checksums_sha256sum_can_check(vae_export):
    lines = (vae_export / CHECKSUMS).read_text().splitlines()
    assert [ln.split("  ")[1] for ln in lines] == ["config.yaml", "model.safetensors"]
    assert all(re.fullmatch(r"[0-9a-f]{64}  \S+", ln) for ln in lines)
    assert verify_checksums(vae_export) is True
    cfg, state = load_export(vae_export, "vae")
    assert cfg.vae.channels == 8 and state


@pytest.mark.parametrize("checksums", [True, False], ids=["with SHA256SUMS", "older export"])
@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_damaged_weights_are_one_line_naming_the_file(export_copy, damage, checksums):
    weights = export_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:len(data) // 2] if damage == "truncated" else os.urandom(5000))
    if not checksums:
        (export_copy / CHECKSUMS).unlink()
    with pytest.raises(ValueError) as e:
        load_export(export_copy, "vae")
    msg = one_line(e)
    assert str(weights) in msg
    assert ("half-copied" if checksums else "not a readable safetensors file") in msg


def test_a_flipped_byte_in_the_tensor_data_fails_the_checksum(export_copy):
    weights = export_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    at = tensor_data_offset(weights) + 100
    data[at] ^= 0x01
    weights.write_bytes(bytes(data))
    read_safetensors(weights)                          # still a valid file: only its sum can tell
    with pytest.raises(ChecksumError) as e:
        load_export(export_copy, "vae")
    msg = one_line(e)
    assert str(weights) in msg and "checksum does not match" in msg and "export or download it again" in msg


def test_an_edited_config_fails_its_checksum(export_copy):
    path = export_copy / "config.yaml"
    path.write_text(path.read_text().replace("channels: 8", "channels: 16", 1))
    with pytest.raises(ChecksumError, match=re.escape(f"{path}: checksum does not match")):
        load_export(export_copy, "vae")


def test_a_damaged_checksum_file_or_a_missing_listed_file_is_one_line(export_copy):
    sums = export_copy / CHECKSUMS
    good = sums.read_text()
    sums.write_text(good.replace("  model.safetensors", "  ../model.safetensors"))
    with pytest.raises(ChecksumError, match=f"{CHECKSUMS}:2: not a"):
        load_export(export_copy, "vae")
    sums.write_text(good + "0" * 64 + "  metrics.json\n")
    with pytest.raises(ChecksumError) as e:
        load_export(export_copy, "vae")
    assert "metrics.json: listed in" in one_line(e)


def test_config_of_another_architecture_is_one_line(export_copy):
    """A config that does not describe its weights (here: twice the channels), as an export
    would hold it had it been written that way (so its checksums agree)."""
    cfg = load_config(export_copy / "config.yaml", ["vae.channels=16"])
    save_config(cfg, export_copy / "config.yaml")
    write_checksums(export_copy)
    with pytest.raises(ConfigError) as e:
        load_export(export_copy, "vae")
    msg = one_line(e)
    assert f"{export_copy / 'config.yaml'} does not match model.safetensors" in msg
    assert "the config makes" in msg


def test_folder_of_another_stage_is_one_line(vae_export):
    with pytest.raises(ConfigError) as e:
        load_export(vae_export, "base")
    assert f"{vae_export}: holds a 'vae' stage, expected 'base'" in one_line(e)


def test_missing_files_are_one_line(export_copy):
    (export_copy / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_export(export_copy)
    assert f"missing checkpoint file: {export_copy / 'config.yaml'}" in one_line(e)


def test_a_cascade_with_a_stage_missing_is_one_line(vae_export, tmp_path):
    from cascade.pipeline import Pipeline
    root = tmp_path / "stages"
    root.mkdir()
    (root / "vae").symlink_to(vae_export)
    with pytest.raises(FileNotFoundError) as e:
        Pipeline(root)
    assert f"stages folder {root} has no 'base' stage (expected {root / 'base'}/model.safetensors)" \
        in one_line(e)
    (root / "base").mkdir()                            # a folder, but nothing exported into it
    with pytest.raises(FileNotFoundError, match="has no 'base' stage"):
        Pipeline(root)


def test_cli_names_the_changed_file_in_one_line(export_copy, tmp_path, capsys):
    from cascade.cli import main
    weights = export_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[tensor_data_offset(weights) + 7] ^= 0x80
    weights.write_bytes(bytes(data))
    root = tmp_path / "stages"
    root.mkdir()
    (root / "vae").symlink_to(export_copy)
    assert main(["sample", "a red circle", "--stages", str(root), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    named = root / "vae" / "model.safetensors"                # the path as the user gave it
    assert len(err.splitlines()) == 1 and f"{named}: checksum does not match" in err, err


@pytest.mark.parametrize("stage", ["vae", "base", "base/guide", "interp", "sr", "../tiny-natural/vae"])
def test_shipped_weights_match_their_checksums(stage):
    folder = REPO / "weights" / "tiny" / stage
    assert verify_checksums(folder) is True
    listed = {ln.split("  ")[1] for ln in (folder / CHECKSUMS).read_text().splitlines()}
    assert {"config.yaml", "model.safetensors"} <= listed
    if (folder / "metrics.json").is_file():
        assert "metrics.json" in listed and json.loads((folder / "metrics.json").read_text())
