"""--calib-data: text files, chat JSONL rendered with the chat template, hub datasets; seeded, recorded,
refused clearly."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_tokenizer

from lowbit import calibration_data as cd
from lowbit.calibration_data import calib_samples
from lowbit.errors import LowbitError

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"


def chat_tokenizer():
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def chats(n: int = 40) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}: how do I boil {i} eggs?"},
                          {"role": "assistant", "content": f"Put {i} eggs in boiling water for nine minutes."}]}
            for i in range(n)]


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_a_text_file_gives_the_windows_plain_text_always_gave(tmp_path):
    text = "The quick brown fox jumps over the lazy dog. " * 200
    (tmp_path / "c.txt").write_text(text)
    tok = byte_tokenizer()
    windows, record = cd.calibration_windows(tok, str(tmp_path / "c.txt"), None, 6, 64, seed=3)
    assert torch.equal(windows, calib_samples(tok, text, 6, 64, seed=3))
    assert record.kind == "text" and record.samples == 6 and record.seed == 3


def test_chat_jsonl_is_rendered_with_the_chat_template(tmp_path):
    tok = chat_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", chats())
    windows, record = cd.calibration_windows(tok, path, None, 4, 32, seed=0)
    assert record.kind == "chat" and record.documents == 40
    rendered = tok.apply_chat_template(chats()[0]["messages"], tokenize=False)
    stream = torch.cat([tok(tok.apply_chat_template(c["messages"], tokenize=False), add_special_tokens=False,
                            return_tensors="pt").input_ids[0] for c in chats()])
    assert record.tokens == stream.numel()
    assert "<|assistant|>" in rendered
    text = tok.decode(windows.flatten().tolist())
    assert "<|user|>" in text or "<|assistant|>" in text or "<|end|>" in text  # the template's markers are there
    again, _ = cd.calibration_windows(tok, path, None, 4, 32, seed=0)
    other, _ = cd.calibration_windows(tok, path, None, 4, 32, seed=1)
    assert torch.equal(windows, again) and not torch.equal(windows, other)  # seeded
    assert "4 × 32 tokens drawn at random, seed 0" in record.describe()


def test_text_rows_in_jsonl_are_taken_as_they_are(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain words here. " * 20}] * 10)
    _, record = cd.calibration_windows(byte_tokenizer(), path, None, 4, 32)
    assert record.kind == "text" and record.documents == 10


@pytest.mark.parametrize("rows,message", [
    (["not json"], "line 1 is not JSON"),
    ([{"messages": [{"role": "user"}]}], "string 'role' and a string 'content'"),
    ([{"messages": []}], "non-empty list"),
    ([{"prompt": "x"}], "expected an object with 'messages'"),
])
def test_bad_jsonl_is_refused_in_one_line(tmp_path, rows, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows))
    with pytest.raises(LowbitError, match=message) as e:
        cd.calibration_windows(chat_tokenizer(), str(path), None, 1, 8)
    assert "\n" not in str(e.value)


def test_chats_without_a_chat_template_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chats())
    with pytest.raises(LowbitError, match="no chat template"):
        cd.calibration_windows(byte_tokenizer(), path, None, 1, 8)


def test_too_little_data_says_how_much_there_is(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chats(2))
    with pytest.raises(LowbitError, match=r"tokens: enough for \d+ samples of 512, but 64 were requested"):
        cd.calibration_windows(chat_tokenizer(), path, None, 64, 512)
    with pytest.raises(LowbitError, match="data file not found"):
        cd.check_source(str(tmp_path / "missing.txt"), None)


def test_a_hub_dataset_id_is_fetched_with_its_chat_column(monkeypatch):
    seen = {}

    def fake_rows(name, config, split, limit=None):
        seen.update(name=name, config=config, split=split)
        return chats()

    monkeypatch.setattr("lowbit.data.fetch_hub_rows", fake_rows)
    _, record = cd.calibration_windows(chat_tokenizer(), "hub:someone/chats:default@train_sft", None, 2, 32)
    assert seen == {"name": "someone/chats", "config": "default", "split": "train_sft"}
    assert record.kind == "hub-chat"
    _, record = cd.calibration_windows(chat_tokenizer(), "someone/chats", None, 2, 32)  # no prefix: not a path
    # no @SPLIT: fetch_hub_rows takes train, or the dataset's only split (tests/test_data_split.py)
    assert seen["split"] is None and record.source == "someone/chats"


def test_the_shipped_chat_sets_are_well_formed():
    """lowbit/assets/chat: calibration and held-out conversations written for lowbit, disjoint."""
    from importlib.resources import files

    sets = {}
    for name in ("calib", "heldout"):
        lines = (files("lowbit") / "assets" / "chat" / f"{name}.jsonl").read_text().splitlines()
        rows = [json.loads(ln) for ln in lines if ln.strip()]
        for r in rows:
            cd.check_messages(r["messages"], name)
            assert r["messages"][-1]["role"] == "assistant"
        sets[name] = {m["content"] for r in rows for m in r["messages"] if m["role"] == "user"}
    assert len(sets["calib"]) >= 90 and len(sets["heldout"]) >= 45
    assert not sets["calib"] & sets["heldout"]
