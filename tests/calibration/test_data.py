"""Calibration data: plain text, JSONL text, chat/instruction JSONL through the chat template; chunking."""

from __future__ import annotations

import json

import pytest
from quantforge.calibration.data import iter_documents, load_chunks, render_record, split_counts

from quantforge.errors import InputError


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_plain_and_jsonl_share_chunks(tmp_path, tok, data_dir):
    c4 = data_dir / "calibration" / "c4_demo.jsonl"
    wiki = data_dir / "wikitext-2" / "wiki.valid.raw"
    ch = load_chunks([wiki, c4], tok, n_tokens=5 * 64, ctx=64, holdout_tokens=3 * 64)
    assert [len(c) for c in ch.calibration] == [64] * 5 and [len(c) for c in ch.holdout] == [64] * 3
    # equal shares: wiki gives 3 calibration + 2 held-out chunks, c4 gives 2 + 1, held-out after calibration
    wiki_ids = tok(wiki.read_text()[:20000], add_special_tokens=False)["input_ids"]
    assert ch.calibration[0] == wiki_ids[:64] and ch.holdout[0] == wiki_ids[3 * 64:4 * 64]
    first_doc = json.loads(c4.open().readline())["text"]
    assert ch.calibration[3] == tok(first_doc + "\n\n", add_special_tokens=False)["input_ids"][:64]
    assert not {tuple(c) for c in ch.calibration} & {tuple(c) for c in ch.holdout}


def test_instruction_records_use_the_chat_template(tmp_path, tok, data_dir):
    record = json.loads((data_dir / "dolly" / "dolly_5k.jsonl").open().readline())
    text = render_record(record, tok, "dolly")
    assert text.startswith("<|im_start|>") and record["instruction"] in text and record["output"] in text
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    (doc,) = iter_documents(chat, tok)
    assert "<|im_start|>user\nhi<|im_end|>" in doc


def test_bad_data_is_an_input_error(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": 1}\n')
    with pytest.raises(InputError, match="none of the fields"):
        list(iter_documents(bad, tok))
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="not valid JSON"):
        list(iter_documents(bad, tok))
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    with pytest.raises(InputError, match="tokens"):
        load_chunks([short], tok, 128, 64, 0)
    with pytest.raises(InputError, match="not found"):
        load_chunks([tmp_path / "missing.txt"], tok, 128, 64, 0)


def test_split_counts():
    assert split_counts(7, 3) == [3, 2, 2] and split_counts(0, 2) == [0, 0]


def test_cli_rejects_missing_data_and_bad_settings(tmp_path, smollm2_dir, capsys):
    from quantforge.cli.main import main

    assert main(["calibrate", str(smollm2_dir), "--data", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "c")]) == 2
    assert "not found" in capsys.readouterr().err
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["calibrate", str(smollm2_dir), "--data", str(text), "-o", str(tmp_path / "c"), "--tokens", "8"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["calibrate", str(smollm2_dir), "--data", str(text), "-o", str(tmp_path / "c"),
                 "--candidates", "q9_k"]) == 2
    assert not (tmp_path / "c").exists()
