"""pie_engine.text.tokenizer against HF AutoTokenizer on the test checkpoint's tokenizer, plus its error paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pie_engine.models.test_model import CHAT_TEMPLATE, build_tokenizer
from pie_engine.text.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog.", "  leading spaces and\nnewlines\t",
         "unicode: héllo wörld — 你好 🙂", "", "</s> is a special token in text"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke"}]


@pytest.fixture(scope="module")
def model_dir(tiny_model) -> Path:
    return tiny_model("llama", layers=1)


def test_encode_decode_match_hf(model_dir: Path) -> None:
    ours, hf = Tokenizer.from_pretrained(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    assert ours.vocab_size == len(hf) == 512
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special), text
            assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if "</s>" not in text:
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    # As in HF, special-token text in the input is the special token (callers must not pass untrusted markup).
    assert 2 in ours.encode("</s> is a special token in text")


def test_special_tokens(model_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(model_dir)
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token_ids == {2}
    assert tok.encode("hi")[0] == 1 and tok.encode("hi", add_special_tokens=False)[0] != 1
    ids = [1, *tok.encode("ok", add_special_tokens=False), 2]
    assert tok.decode(ids) == "ok"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>ok</s>"


def test_eos_ids_union_config_and_generation_config(model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    gen = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 7, 9]}))
    assert Tokenizer.from_pretrained(d).eos_token_ids == {2, 7, 9}


@pytest.mark.parametrize("gen_prompt", [True, False])
def test_chat_template_matches_hf(model_dir: Path, gen_prompt: bool) -> None:
    ours, hf = Tokenizer.from_pretrained(model_dir), transformers.AutoTokenizer.from_pretrained(model_dir)
    text = ours.apply_chat_template(MESSAGES, add_generation_prompt=gen_prompt)
    assert text == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen_prompt)
    assert text.startswith("<s><|system|>\nBe brief.</s>\n") and text.endswith("<|assistant|>\n") == gen_prompt
    # The template carries BOS, so the prompt is encoded without adding another one (as HF tokenize=True does).
    assert ours.encode(text, add_special_tokens=False) == hf.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=gen_prompt)


def test_chat_content_parts_are_joined(model_dir: Path) -> None:
    tok = Tokenizer.from_pretrained(model_dir)
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "ab"}])


def test_no_chat_template_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_pretrained(d).apply_chat_template(MESSAGES)
    # Newer transformers save the template as chat_template.jinja next to the tokenizer.
    (d / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    assert Tokenizer.from_pretrained(d).apply_chat_template(MESSAGES[:1]).startswith("<s><|system|>")


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_test_tokenizer_is_deterministic_and_fills_vocab() -> None:
    a, b = build_tokenizer(300, seed=0), build_tokenizer(300, seed=0)
    assert a.to_str() == b.to_str() and a.get_vocab_size() == 300
    with pytest.raises(ValueError, match="at least 259"):
        build_tokenizer(100)
