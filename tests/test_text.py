"""The frozen text encoder: packaged MiniLM, tiny test encoder, cache, null prompt, errors."""
import pytest
import torch

from cascade.config import TextConfig
from cascade.text import TextEncoder, minilm_path, tiny_text_encoder

PROMPTS = ["a red circle moving left on a blue background", "a green square moving up on a black background"]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.from_config(TextConfig(encoder="minilm", max_length=32))


def test_minilm_shapes_mask_and_frozen(minilm):
    out = minilm(PROMPTS + ["hi"])
    assert out["text"].shape == (3, 32, 384) and out["pooled"].shape == (3, 384)
    assert out["text_mask"].dtype == torch.bool and out["text_mask"].shape == (3, 32)
    counts = [len(minilm.tokenizer(p)["input_ids"]) for p in PROMPTS + ["hi"]]   # with [CLS], [SEP]
    assert out["text_mask"].sum(1).tolist() == counts
    assert (out["text"][~out["text_mask"]] == 0).all()                      # padding states are zero
    assert minilm.dim == 384 and not minilm.training
    assert all(not p.requires_grad for p in minilm.parameters())
    minilm.train()
    assert not minilm.model.training                                        # stays in eval mode


def test_minilm_pooled_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(PROMPTS, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(ref.float(), minilm(PROMPTS)["pooled"])
    assert (cos > 0.99).all(), cos


def test_same_prompts_same_embeddings_and_cache(minilm):
    a = minilm(PROMPTS)
    b = minilm([PROMPTS[1], PROMPTS[0], PROMPTS[1]])
    assert torch.equal(a["text"][0], b["text"][1]) and torch.equal(a["pooled"][1], b["pooled"][2])
    assert not torch.allclose(a["pooled"][0], a["pooled"][1])
    assert PROMPTS[0] in minilm._cache


def test_null_and_empty_prompt(minilm):
    null = minilm.null(3)
    assert null["text"].shape == (3, 32, 384) and not null["text_mask"].any()
    assert null["pooled"].shape == (3, 384) and not null["pooled"].any()
    for bad in ("", "   ", "\n"):
        with pytest.raises(ValueError, match="empty prompt"):
            minilm(["fine", bad])


def test_tiny_encoder():
    enc = tiny_text_encoder(dim=32, max_length=16)
    out = enc(PROMPTS)
    assert out["text"].shape == (2, 16, 32) and out["pooled"].shape == (2, 32) and enc.dim == 32
    assert enc.model.config.vocab_size == len(enc.tokenizer)
    assert torch.equal(tiny_text_encoder()(PROMPTS)["pooled"], out["pooled"])   # seeded init
    assert not torch.allclose(out["pooled"][0], out["pooled"][1])


def test_missing_hub_model_is_a_one_line_error(tmp_path):
    with pytest.raises(OSError) as e:
        TextEncoder.from_config(TextConfig(encoder="no-such-org/no-such-model"))
    msg = str(e.value)
    assert "\n" not in msg and "not available offline" in msg and "local folder" in msg
    with pytest.raises(OSError, match="no config.json"):
        TextEncoder.from_pretrained(str(tmp_path))


def test_config_dim_mismatch_names_the_key():
    with pytest.raises(ValueError, match="text.dim"):
        TextEncoder.from_config(TextConfig(dim=32))
