"""Incremental detokenization and stop strings, with a real byte-level BPE tokenizer (multi-byte characters split
across tokens)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pie_engine.text.detokenizer import IncrementalDetokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "stop here please",
          "naïve café, 東京 and 🙂 emoji"] * 20


class HFDecoder:
    """The Decoder protocol over a `tokenizers.Tokenizer`."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    t.train_from_iterator(CORPUS, trainer)
    return t


def stream(tok: Tokenizer, prompt: str, ids: list[int],
           stop: tuple[str, ...] | list[str] = ()) -> tuple[list[str], IncrementalDetokenizer]:
    det = IncrementalDetokenizer(HFDecoder(tok), tok.encode(prompt).ids, stop)
    deltas = []
    for i, t in enumerate(ids):
        hit = det.add_token(t, final=i == len(ids) - 1)
        deltas.append(det.take_delta(finished=hit or i == len(ids) - 1))
        if hit:
            break
    return deltas, det


@pytest.mark.parametrize("text", ["hello world", " naïve café", "東京 🙂 and 🙂🙂 emoji!", "the lazy dog 🙂"])
def test_streamed_deltas_concatenate_to_the_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    deltas, det = stream(tok, "hello there", ids)
    assert "".join(deltas) == tok.decode(ids) == det.text
    assert not any("\ufffd" in d for d in deltas), deltas
    # Multi-byte characters really are split across tokens here (otherwise this test proves nothing).
    if "🙂" in text:
        assert any("\ufffd" in tok.decode([t]) for t in ids)


def test_special_tokens_are_skipped(tok: Tokenizer) -> None:
    ids = tok.encode("hello world").ids + [tok.token_to_id("<eos>")]
    deltas, det = stream(tok, "x", ids)
    assert det.text == "hello world" and "".join(deltas) == "hello world"


def test_incomplete_character_at_the_end_is_flushed_when_final(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🙂").ids
    cut = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    deltas, det = stream(tok, "", ids[:cut])
    assert det.text == tok.decode(ids[:cut])  # the final flush emits the partial character rather than lose it


def test_stop_string_cuts_output(tok: Tokenizer) -> None:
    ids = tok.encode("hello world, stop here please").ids
    deltas, det = stream(tok, "", ids, stop=["stop", "zzz"])
    assert det.stopped and det.text == "hello world, "
    assert "".join(deltas) == "hello world, "
    assert len(deltas) < len(ids)  # it stopped at the token completing "stop", not at the end


def test_stop_prefix_is_held_back_until_resolved(tok: Tokenizer) -> None:
    char_ids = {c: tok.encode(c).ids for c in "abxyz q"}
    assert all(len(v) == 1 for v in char_ids.values())
    det = IncrementalDetokenizer(HFDecoder(tok), [], stop=["xyz"])
    out = []
    for c in "abxy":
        det.add_token(char_ids[c][0])
        out.append(det.take_delta(finished=False))
    assert "".join(out) == "ab"  # "xy" could still become "xyz"
    det.add_token(char_ids["q"][0])
    assert det.take_delta(finished=False) == "xyq"
    for c in "xyz":
        hit = det.add_token(char_ids[c][0])
    assert hit and det.text == "abxyq" and det.take_delta(finished=True) == ""


def test_stop_string_spanning_tokens_and_earliest_match_wins(tok: Tokenizer) -> None:
    ids = tok.encode("the quick brown fox jumps").ids
    _, det = stream(tok, "", ids, stop=["fox", "ick br"])
    assert det.text == "the qu"


def test_no_stop_without_stop_strings(tok: Tokenizer) -> None:
    ids = tok.encode("stop here").ids
    deltas, det = stream(tok, "", ids)
    assert not det.stopped and det.text == "stop here"
