"""The server's text pipeline without HTTP: incremental detokenization never splits a
multi-byte character and equals one decode of the whole sequence; stop strings are cut
across token boundaries with nothing leaked, not even a prefix (B21, B29 pass-through).

Uses the embedded SmolLM2 tokenizer (byte-level BPE: emoji and CJK characters span several
tokens) when it is in the cache, and the tiny WordLevel tokenizer always.
"""

from __future__ import annotations

import random

import pytest

from trimode.entrypoints.server.text import IncrementalDetokenizer, TextStream

SAMPLES = ["héllo 日本語 🎉 ok", "a🎉🎉b", "</think>answer", "Count: 1, 2, 3,\n\n4", "ÿ€😀x"]


@pytest.fixture(scope="module")
def bpe():
    from trimode.checkpoint.embedded import cache_root

    from transformers import AutoTokenizer

    path = next(cache_root().glob("smollm2-135m-instruct-v*"), None)
    assert path is not None, "the embedded model cache is missing: run `trimode generate hi` once"
    hf = AutoTokenizer.from_pretrained(str(path))
    return hf, (lambda ids: hf.decode(ids, skip_special_tokens=True))


def stream_pieces(decode, ids, stop=(), steps=None):
    """Feed ids in the given step sizes; return (pieces taken after each step, stream)."""
    ts = TextStream(decode, stop)
    pieces, k = [], 0
    for size in steps or [1] * len(ids):
        for t in ids[k : k + size]:
            if ts.add(t):
                break
        k += size
        if ts.stopped:
            break
        pieces.append(ts.take())
    if not ts.stopped:
        ts.close()
    pieces.append(ts.take())
    return pieces, ts


def test_multibyte_never_split_and_equals_full_decode(bpe):
    hf, decode = bpe
    rng = random.Random(0)
    for text in SAMPLES:
        ids = hf(text, add_special_tokens=False).input_ids
        assert len(ids) > len(text.split())  # some characters really span tokens
        for _ in range(20):
            steps = []
            while sum(steps) < len(ids):
                steps.append(rng.randint(1, 4))
            pieces, ts = stream_pieces(decode, ids, steps=steps)
            assert "".join(pieces) == decode(ids) == text
            assert all("\ufffd" not in p for p in pieces)
            assert ts.n_tokens == len(ids)


def test_detokenizer_flush_keeps_an_incomplete_tail(bpe):
    hf, decode = bpe
    ids = hf("x🎉", add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(decode)
    held = "".join(d.push(t) for t in ids[:-1])
    assert held == "x"  # the emoji's first bytes are held back
    assert held + d.flush() == decode(ids[:-1])  # U+FFFD, as a whole decode gives


@pytest.mark.parametrize("stop", [["</think>"], ["🎉"], ["3,\n"], ["nothing", "ll"]])
def test_stop_string_across_tokens_never_leaks(bpe, stop):
    hf, decode = bpe
    rng = random.Random(1)
    for text in SAMPLES:
        ids = hf(text, add_special_tokens=False).input_ids
        full = decode(ids)
        cut = min([full.find(s) for s in stop if s in full], default=-1)
        expected = full if cut < 0 else full[:cut]
        for _ in range(10):
            steps = [rng.randint(1, 3) for _ in ids]
            pieces, ts = stream_pieces(decode, ids, stop, steps)
            # Sent text is never taken back, so any leak (even of a stop-string prefix)
            # would make the concatenation longer than the cut text.
            assert "".join(pieces) == expected
            assert ts.stopped == (cut >= 0)
            if cut >= 0:  # only the tokens needed to complete the stop string are counted
                assert stop_token_count(decode, ids, stop) == ts.n_tokens


def stop_token_count(decode, ids, stop) -> int:
    for k in range(1, len(ids) + 1):
        if any(s in decode(ids[:k]) for s in stop):
            return k
    return len(ids)


def test_held_prefix_released_when_it_turns_out_not_to_be_a_stop():
    vocab = {10: "ab", 11: "c", 12: "d"}
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    ts = TextStream(decode, ["bcx"])
    ts.add(10)
    assert ts.take() == "a"  # "b" could start "bcx"
    ts.add(11)
    assert ts.take() == ""  # "bc" still could
    ts.add(12)
    assert ts.take() == "bcd" and not ts.stopped


def test_think_tags_pass_through_unchanged():
    """B29: trimode has no reasoning parser, so tag fragments split over chunks come out
    exactly as the model wrote them (no reasoning field, nothing dropped or moved)."""
    pieces = ["<th", "ink>plan", "</th", "ink>answer"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    for steps in ([1, 1, 1, 1], [2, 2], [4], [1, 3]):
        out, ts = stream_pieces(decode, list(range(4)), steps=steps)
        assert "".join(out) == "<think>plan</think>answer"
    out, _ = stream_pieces(lambda ids: "".join(["...</th", "ink>answer"][i] for i in ids), [0, 1])
    assert "".join(out) == "...</think>answer"


def test_wordlevel_tokenizer(tiny_llm):
    decode = tiny_llm.tokenizer.decode
    ids = tiny_llm.tokenizer.encode("w5 w6 w7 w8 w9")
    pieces, _ = stream_pieces(decode, ids, steps=[2, 3])
    assert "".join(pieces) == decode(ids) == "w5 w6 w7 w8 w9"
    pieces, ts = stream_pieces(decode, ids, stop=["w7 w"], steps=[1, 1, 1, 1, 1])
    assert "".join(pieces) == "w5 w6 " and ts.n_tokens == 4
