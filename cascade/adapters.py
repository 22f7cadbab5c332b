"""LoRA adapters for any DiT or U-Net stage (Hu et al. 2021, "LoRA: Low-Rank Adaptation"), made
and read with PEFT, the library their users already have.

Training (`cascade train <stage yaml> train.init_from=EXPORT train.lora.rank=R`): `add_lora`
injects rank-R adapters into the linears named by train.lora.targets and freezes every other
weight; the same DeepSpeed trainer runs (resume, ZeRO, several ranks). The fused kernels that
read a linear's weight directly see W + scaling * B A (`models.layers.weight_and_bias`).

The export is an adapter folder: adapter_model.safetensors and adapter_config.json exactly as
PEFT's `save_pretrained` writes them (`PeftModel.from_pretrained(network, folder)` loads it),
plus cascade_adapter.json (the stage, its network's architecture and the SHA-256 of the stage
export it was trained on) and SHA256SUMS. `read_adapter` refuses an adapter for another stage,
architecture or base export in one line naming both; `merge` folds one into a state dict
(W += scale * lora_alpha / r * B A), which is how `cascade sample --adapter DIR[:SCALE]` applies
adapters and `cascade merge-adapter` writes a merged export.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

META = "cascade_adapter.json"
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PEFT_PREFIX = "base_model.model."          # PeftModel's key prefix in saved adapters


def peft_config(lora, modules: list[str] | None = None):
    """cascade.config.LoRAConfig -> peft.LoraConfig (alpha 0 means alpha = rank: scaling 1);
    modules: the full names of the linears adapted (`target_linears`), else the suffixes."""
    from peft import LoraConfig
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                      target_modules=modules or list(lora.targets), bias="none")


def target_linears(net: torch.nn.Module, targets) -> list[str]:
    """Full names of net's nn.Linear modules named by a target suffix ("qkv", "mlp.0"): only
    linears, so a convolution called "proj" (the U-Net has one) is not matched."""
    return [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)
            and any(n == t or n.endswith("." + t) for t in targets)]


def add_lora(net: torch.nn.Module, lora) -> torch.nn.Module:
    """Inject LoRA adapters into net's target linears (in place) and freeze everything else."""
    from peft import inject_adapter_in_model
    modules = target_linears(net, lora.targets)
    if not modules:
        raise ValueError(f"train.lora.targets: {list(lora.targets)} name no linear layer of the "
                         f"{type(net).__name__}")
    net = inject_adapter_in_model(peft_config(lora, modules), net)
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    return net


def network_section(cfg) -> tuple[str, dict]:
    """The config section that is a stage's architecture: ('dit' | 'unet', its fields)."""
    from dataclasses import asdict
    name = "unet" if cfg.stage == "sr" else "dit"
    return name, asdict(getattr(cfg, name))


def export_adapter(cfg, state: dict, folder: Path, base_folder: str | Path) -> Path:
    """The LoRA tensors of `state` (a LoRA network's state dict, e.g. its EMA) -> an adapter
    folder in PEFT's format with cascade_adapter.json and SHA256SUMS, replaced whole."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from cascade.checksums import file_sha256, write_checksums
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        adapters = {PEFT_PREFIX + k.replace(".default.", "."): v.contiguous()
                    for k, v in state.items() if "lora_" in k}
        save_file(adapters, str(tmp / WEIGHTS), metadata={"format": "pt"})
        pc = peft_config(cfg.train.lora)
        pc.base_model_name_or_path = str(base_folder)
        pc.save_pretrained(str(tmp))
        net, arch = network_section(cfg)
        (tmp / META).write_text(json.dumps({
            "stage": cfg.stage, "network": net, "architecture": arch,
            "base_export": str(base_folder),
            "base_sha256": file_sha256(Path(base_folder) / "model.safetensors"),
            "rank": cfg.train.lora.rank, "targets": list(cfg.train.lora.targets)}, indent=1) + "\n")
        write_checksums(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_adapter(folder: str | Path, stage_cfg=None, stage_folder: str | Path | None = None):
    """An adapter folder -> (meta, PEFT config dict, tensors), checked (SHA256SUMS) and, when a
    stage is given, refused in one line unless it was trained on that stage: the same stage
    name, architecture and base export checksum."""
    from cascade.checksums import file_sha256, verify_checksums
    from cascade.stages import read_safetensors
    folder = Path(folder)
    for name in (META, CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: not an adapter folder (no {name})")
    verify_checksums(folder)
    meta = json.loads((folder / META).read_text())
    config = json.loads((folder / CONFIG).read_text())
    if stage_cfg is not None:
        net, arch = network_section(stage_cfg)
        if meta["stage"] != stage_cfg.stage:
            raise ValueError(f"adapter {folder} is for the '{meta['stage']}' stage, not the "
                             f"'{stage_cfg.stage}' stage of {stage_folder}")
        if meta["network"] != net or meta["architecture"] != arch:
            diff = sorted(k for k in arch if meta["architecture"].get(k) != arch[k])
            raise ValueError(f"adapter {folder} was trained on another {net} architecture than "
                             f"{stage_folder}'s (differs in {', '.join(diff) or 'its network'})")
        have = file_sha256(Path(stage_folder) / "model.safetensors")
        if meta["base_sha256"] != have:
            raise ValueError(f"adapter {folder} was trained on {meta['base_export']} (sha256 "
                             f"{meta['base_sha256'][:12]}), not on {stage_folder} (sha256 {have[:12]})")
    return meta, config, read_safetensors(folder / WEIGHTS)


def merge(state: dict, config: dict, tensors: dict, scale: float = 1.0) -> dict:
    """A stage's state dict with an adapter folded in: for every adapted linear m,
    W_m += scale * lora_alpha / r * B_m A_m (PEFT's scaling; rsLoRA: alpha / sqrt(r))."""
    import math
    r, alpha = config["r"], config["lora_alpha"]
    scaling = scale * alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    out = dict(state)
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        w = f"{module}.weight"
        if w not in out:
            raise ValueError(f"adapter: it adapts '{module}', which the stage's network has not")
        out[w] = out[w] + scaling * (b.float() @ a.float()).to(out[w].dtype)
    return out


def parse_adapter_arg(text: str) -> tuple[str, float]:
    """'DIR' or 'DIR:SCALE' -> (DIR, scale); a scale that is not a finite number is one line."""
    import math
    folder, _, scale = text.rpartition(":") if ":" in text else (text, "", "1")
    if not folder:
        folder, scale = text, "1"
    try:
        value = float(scale)
    except ValueError:
        folder, value = text, 1.0
    if not math.isfinite(value):
        raise ValueError(f"--adapter {text}: the scale must be a finite number")
    return folder, value
