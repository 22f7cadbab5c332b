"""Prompt extension: a short prompt rewritten into the detailed kind the model was trained on.

DALL-E 3 (Betker et al. 2023, Sec. 3.5 and App. C) trains on long descriptive captions and, at
sampling, has a language model "upsample" a user's short prompt into one; Make-A-Video and
Tune-A-Video likewise feed the text encoder richer prompts than users type. `cascade sample
--extend-prompt` does it before the text encoder:

- with `--extend-model PATH` (a local transformers causal LM, by folder or a name already in the
  Hugging Face cache; nothing is downloaded) the LM continues a rewrite template greedily, so
  the same prompt always extends the same way;
- without it, a rule-based extension for the embedded synthetic domain: the colour, shape,
  motion and background the prompt names are kept and the ones it leaves out are filled in
  (picked by a hash of the prompt, so deterministic), in the caption grammar the shipped models
  were trained on ("red circle" -> "a red circle moving up on a black background"). A prompt that
  names nothing of the domain is refused in one line naming what to pass instead.

Meaning is kept by construction: the extension starts with the user's own prompt (an LM's words
come after it; the rule-based one keeps every attribute the prompt names), and the words added
are cut to fit the text encoder's max_length tokens, so the encoder never drops the user's words
to make room for the added ones.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

TEMPLATE = ("Rewrite a short video prompt as a detailed description of what is seen.\n"
            "Short: {prompt}\nDetailed: {prompt},")


def _pick(options, prompt: str, what: str):
    """A deterministic choice among options, keyed by the prompt and what is being chosen."""
    options = list(options)
    h = int(hashlib.sha1(f"{what}:{prompt.strip().lower()}".encode()).hexdigest(), 16)
    return options[h % len(options)]


def extend_synthetic(prompt: str) -> str:
    """Rule-based extension in the embedded domain's grammar (module docstring); ValueError for a
    prompt that names no colour, shape, motion or background of the domain."""
    from cascade.data.synthetic import (ALLOWED_BACKGROUNDS, BACKGROUNDS, COLOURS, MOTIONS, SHAPES,
                                        make_caption)
    text = " ".join(re.findall(r"[a-z]+", prompt.lower()))
    background = None
    m = re.search(r"\b(\w+) (?:background|backdrop)\b", text) or re.search(r"\bon (?:an? )?(\w+)\b", text)
    if m and m.group(1) in BACKGROUNDS:
        background = m.group(1)
        text = text[:m.start(1)] + text[m.end(1):]                      # not the object's colour
    words = text.split()
    colour = next((w for w in words if w in COLOURS), None)
    singular = {w: next((s for s in (w, w[:-1], w[:-2]) if s in SHAPES), None) for w in words}
    shape = next((singular[w] for w in words if singular[w]), None)    # "crosses" -> cross
    motion = next((mo for mo in MOTIONS if mo.split()[-1] in words), None)
    if motion is None and any(w in words for w in ("still", "static", "stationary")):
        motion = "standing still"
    if not (colour or shape or motion or background):
        raise ValueError(f"--extend-prompt: '{prompt}' names nothing of the embedded synthetic "
                         f"domain (colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}): pass "
                         f"--extend-model PATH, a local transformers causal language model folder")
    if colour is None:
        colour = _pick([c for c in COLOURS if background is None or background in ALLOWED_BACKGROUNDS[c]],
                       prompt, "colour")
    shape = shape or _pick(SHAPES, prompt, "shape")
    motion = motion or _pick(MOTIONS, prompt, "motion")
    if background is None:
        background = _pick(ALLOWED_BACKGROUNDS[colour], prompt, "background")
    return make_caption(shape, colour, motion, background)


def load_causal_lm(name_or_path: str, device="cpu"):
    """(tokenizer, model) of a local causal LM; a missing one is a one-line FileNotFoundError."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    p = Path(name_or_path).expanduser()
    looks_local = p.is_absolute() or name_or_path.startswith((".", "~")) or p.exists()
    if looks_local and not p.is_dir():
        raise FileNotFoundError(f"--extend-model: {name_or_path} is not a folder (a transformers "
                                f"causal LM: config.json, weights, tokenizer files)")
    try:
        tok = AutoTokenizer.from_pretrained(str(p) if looks_local else name_or_path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(p) if looks_local else name_or_path,
                                                     local_files_only=True)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "cannot be loaded" if looks_local else "is not a local folder nor in the Hugging Face cache"
        raise FileNotFoundError(f"--extend-model: '{name_or_path}' {where} (nothing is downloaded "
                                f"at run time): {first}") from None
    return tok, model.eval().requires_grad_(False).to(device)


def fit_words(head: str, extra: str, tokenizer, max_length: int) -> str:
    """head + ', ' + as much of extra as fits max_length tokens of tokenizer (the text encoder's,
    special tokens included), cut at a token; head alone when nothing fits."""
    if tokenizer is None:
        return f"{head}, {extra}"
    ids = tokenizer(extra, add_special_tokens=False)["input_ids"]
    for n in range(min(len(ids), max_length), 0, -1):
        text = f"{head}, {tokenizer.decode(ids[:n], skip_special_tokens=True).strip()}"
        if len(tokenizer(text)["input_ids"]) <= max_length:
            return text
    return head


class PromptExtender:
    """prompt -> extended prompt, by a local causal LM (`model`) or the rule-based default."""

    def __init__(self, model: str | None = None, max_new_tokens: int = 40, device="cpu"):
        self.max_new_tokens = max_new_tokens
        self.name = model or "rules (embedded synthetic domain)"
        self.lm = load_causal_lm(model, device) if model else None

    def __call__(self, prompt: str, tokenizer=None, max_length: int | None = None) -> str:
        """`tokenizer`, `max_length`: the text encoder's; the added words are cut to fit them."""
        prompt = " ".join(prompt.split())
        if self.lm is None:
            return extend_synthetic(prompt)
        import torch
        tok, model = self.lm
        enc = tok(TEMPLATE.format(prompt=prompt), return_tensors="pt")
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                 num_beams=1, pad_token_id=pad)
        extra = tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        extra = " ".join(extra.split("\n")[0].split()).strip(" ,")
        if not extra:
            return prompt
        return fit_words(prompt, extra, tokenizer, max_length) if max_length else f"{prompt}, {extra}"
