"""Prompt extension before sampling: a tiny random causal LM (by path) or the rule-based default
of the embedded domain; the extension keeps the user's prompt, fits the text encoder's
max_length, is printed and saved beside the video."""
import json

import pytest
import torch

from cascade.cli import main
from cascade.data.synthetic import parse_caption
from cascade.prompt_extend import PromptExtender, extend_synthetic
from test_pipeline import stages  # noqa: F401  (fixture, reused)

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random GPT-2 with the packaged MiniLM tokenizer, saved and loaded back by path."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from cascade.text import minilm_path
    root = tmp_path_factory.mktemp("lm")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                       n_positions=128, pad_token_id=tok.pad_token_id))
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_rule_based_extension_keeps_what_the_prompt_names():
    for short in ["red circle", "a blue square moving up", "triangles on a white background", "still"]:
        full = extend_synthetic(short)
        meta = parse_caption(full)                              # in the training captions' grammar
        named = set(short.replace("triangles", "triangle").split())
        kept = {meta["colour"], meta["shape"], *meta["motion"].split(), meta["background"]}
        assert kept >= named - {"a", "on", "background"}
        assert extend_synthetic(short) == full                  # deterministic
    full = "a red circle moving left on a blue background"
    assert extend_synthetic(full) == full                       # already detailed: unchanged
    with pytest.raises(ValueError, match="--extend-model"):
        extend_synthetic("a cat playing the piano")


def test_lm_extension_starts_with_the_prompt_and_fits_max_length(tiny_lm):
    from transformers import AutoTokenizer
    ext = PromptExtender(str(tiny_lm), max_new_tokens=30)
    tok = AutoTokenizer.from_pretrained(str(tiny_lm), local_files_only=True)
    long = ext("a red circle")
    assert long.startswith("a red circle") and long == ext("a red circle")   # greedy: deterministic
    fitted = ext("a red circle", tok, 12)
    assert fitted.startswith("a red circle, ") and len(tok(fitted)["input_ids"]) <= 12
    with pytest.raises(FileNotFoundError, match="--extend-model"):
        PromptExtender(str(tiny_lm / "missing"))


@pytest.mark.parametrize("model", [None, "lm"])
def test_cli_sample_extend_prompt_prints_and_saves_it(stages, tiny_lm, tmp_path, capsys, model):  # noqa: F811
    out = tmp_path / "out"
    extra = ["--extend-model", str(tiny_lm)] if model else ["--extend-prompt"]
    rc = main(["sample", "red circle", "--stages", str(stages), "--out", str(out), "--steps", "2",
               "--no-progress", *extra])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    line = next(ln for ln in captured.out.splitlines() if ln.startswith("prompt: red circle -> "))
    extended = line.split(" -> ", 1)[1]
    assert extended != "red circle"
    assert (out / "000_red_circle.mp4").is_file()
    assert (out / "000_red_circle.txt").read_text().strip() == extended
    rows = json.loads((out / "prompts.json").read_text())
    assert rows == [{"video": "000_red_circle.mp4", "prompt": "red circle", "extended": extended,
                     "extender": str(tiny_lm) if model else "rules (embedded synthetic domain)"}]
    if model is None:
        parse_caption(extended)
    else:
        assert extended.startswith("red circle")


def test_cli_extend_refusals_are_one_line(stages, tmp_path, capsys):  # noqa: F811
    rc = main(["sample", "a cat", "--stages", str(stages), "--out", str(tmp_path), "--extend-prompt",
               "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--extend-model" in err, err
    rc = main(["sample", "a cat", "--stages", str(stages), "--out", str(tmp_path),
               "--extend-model", str(tmp_path / "nope"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "nope" in err, err
