"""Data shapes, loss masking and bad-input errors of the trainer's data stage (SmolLM2's tokenizer and template)."""

from __future__ import annotations

import json

import pytest

from quantforge.errors import InputError
from quantforge.train.data import build_examples, load_tokenizer, tokenize_record


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def _target_text(tok, ex):
    return tok.decode([t for t, m in zip(ex.ids, ex.loss_mask) if m])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_instruction_mask_is_exactly_the_response(tok):
    rec = {"instruction": "Name a color.", "input": "Think of the sky.", "output": "Blue is a color."}
    ex = tokenize_record(tok, rec, "instruction")
    assert _target_text(tok, ex) == "Blue is a color.<|im_end|>\n"
    full = tok.decode(ex.ids)
    assert "Name a color.\n\nThink of the sky." in full
    assert full.endswith("<|im_start|>assistant\nBlue is a color.<|im_end|>\n")
    labels = ex.labels()
    assert labels[-1] == -100 and sum(x != -100 for x in labels) == sum(ex.loss_mask[1:])


def test_chat_mask_covers_every_assistant_turn_only(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    ex = tokenize_record(tok, {"messages": msgs}, "chat")
    assert _target_text(tok, ex) == "Hello!<|im_end|>\nGoodbye.<|im_end|>\n"
    assert tok.decode(ex.ids) == tok.apply_chat_template(msgs, tokenize=False)


def test_text_mask_is_everything(tok):
    ex = tokenize_record(tok, {"text": "Plain text to learn."}, "text")
    assert all(ex.loss_mask) and ex.ids[-1] == tok.eos_token_id
    assert tok.decode(ex.ids, skip_special_tokens=True) == "Plain text to learn."


def test_reads_jsonl_parquet_and_saved_folder(tok, tmp_path):
    import datasets

    rows = [{"text": f"example number {i}"} for i in range(5)]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    got = [build_examples(src, tok, 64)[0] for src in (jsonl, tmp_path / "d.parquet", tmp_path / "saved", ds)]
    assert all([e.ids for e in g] == [e.ids for e in got[0]] for g in got) and len(got[0]) == 5


def test_bad_inputs_are_clear_errors(tok, tmp_path):
    with pytest.raises(InputError, match="no usable examples"):
        build_examples(_write_jsonl(tmp_path / "e.jsonl", [{"text": " "}, {"text": ""}]), tok, 64)
    with pytest.raises(InputError, match="cannot read the column layout"):
        build_examples(_write_jsonl(tmp_path / "c.jsonl", [{"question_x": 1, "body": "a"}]), tok, 64)
    with pytest.raises(InputError, match="below the shortest example"):
        build_examples(_write_jsonl(tmp_path / "l.jsonl", [{"text": "a b c d e f g h i j k"}]), tok, 3)
    tok_nt = load_tokenizer(tok.name_or_path)
    tok_nt.chat_template = None
    with pytest.raises(InputError, match="no chat template"):
        build_examples(_write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "output": "b"}]), tok_nt, 64)
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(InputError, match="expected .jsonl"):
        build_examples(tmp_path / "x.csv", tok, 64)
