"""WikiText-2 validation cut into a calibration part and a dev part; the online path rebuilds the same text;
window lengths are checked only where they are used."""
from __future__ import annotations

import hashlib
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import byte_tokenizer, tiny_llama

from lowbit import data
from lowbit.calibration_data import calibration_windows, check_source
from lowbit.errors import LowbitError
from lowbit.experiment import CalibOptions, Session

TITLE = re.compile(r"^ = [^=].* = $")  # an article's title line; sections are " = = ... = = "
VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"  # /work/shared/data/README.md
MARKER = "zebraquokka"  # a word only the fake dev part holds


def starts_of(text: str) -> list[int]:
    """Where each article's title line starts."""
    return [m.start() for m in re.finditer(r"(?m)^ = [^=].* = $", text)]


def hub_rows(text: str) -> list[str]:
    """The rows Hugging Face's wikitext script makes of a word-level file: each line with its newline, and a
    blank line (" \\n" in these files) as ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def article(title: str, words: str, paragraphs: int = 6) -> str:
    body = "".join(f" {words} {i} , and so on . \n \n" for i in range(paragraphs))
    return f" \n = {title} = \n \n = = A section = = \n \n{body}"


def fake_validation() -> str:
    calib = article("Homarus gammarus", "lobsters live in the sea") + article("Another", "ships sail on rivers")
    dev = article(data.CUT_TITLE.strip(" =").strip(), f"the {MARKER} grazes here")
    return calib + dev[len(" \n"):]  # the title's blank line before it stays in the calibration part, as in the file


@pytest.fixture
def fake_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    (d / "wikitext-2").mkdir(parents=True)
    (d / "wikitext-2-raw").mkdir()
    (d / "wikitext-2" / "valid.txt").write_text(fake_validation(), encoding="utf-8")
    (d / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Test article = \n The test words . \n" * 200)
    return d


@pytest.fixture
def validation(data_dir) -> str:
    path = data_dir / data.CALIB_FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VALID_SHA256
    return data.validation_text(str(data_dir))


def test_the_parts_are_disjoint_and_make_the_whole_validation_text(validation, data_dir):
    calib, dev = data.split_validation(validation)
    assert calib + dev == validation and calib and dev
    assert calib == data.calib_text(None, str(data_dir)) and dev == data.dev_text(str(data_dir))
    # the documented cut, exactly
    assert len(calib.encode()) == data.CUT_BYTE and calib.count("\n") == data.CUT_LINE
    assert len(validation.encode()) == 1121681 and validation.count("\n") == 3760
    # every article wholly on one side: the article starts of the whole are those of the two parts
    starts = [starts_of(t) for t in (validation, calib, dev)]
    assert starts[0] == starts[1] + [len(calib) + i for i in starts[2]] and len(starts[0]) == 60
    assert starts[2][0] == 0 and (len(starts[1]), len(starts[2])) == (46, 14)


def test_the_cut_is_at_an_article_boundary(validation):
    calib, dev = data.split_validation(validation)
    first = dev.splitlines()[0]
    assert first == data.CUT_TITLE and TITLE.match(first)
    assert calib.endswith(" \n \n")  # the previous article ends with its blank lines, as every article does
    assert 0.70 < len(calib) / len(validation) < 0.75


@pytest.mark.model
def test_the_dev_part_gives_at_least_24_windows_of_2048_smollm2_tokens(validation):
    from transformers import AutoTokenizer

    from lowbit.eval.perplexity import tokenize_windows
    from lowbit.models.loading import builtin_gguf

    path = builtin_gguf("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    calib, dev = data.split_validation(validation)
    n_calib, n_dev = (len(tok(t).input_ids) for t in (calib, dev))
    assert (n_calib, n_dev) == (193616, 80252)  # as lowbit.data's docstring states
    assert n_dev // 2048 == 39 >= 24
    assert tokenize_windows(tok, dev, 2048, None).shape == (39, 2048)


def test_calibration_windows_never_hold_dev_text(fake_dir):
    tok = byte_tokenizer()
    calib = data.calib_text(None, str(fake_dir))
    assert MARKER not in calib and MARKER in data.dev_text(str(fake_dir))
    n = len(tok(calib).input_ids) // 16  # every window there is: all of the calibration part
    windows, record = calibration_windows(tok, None, str(fake_dir), n, 16, seed=0)
    drawn = "".join(tok.decode(w) for w in windows.tolist())
    assert MARKER not in drawn and "lobsters" in drawn and "ships" in drawn
    assert record.source == "wikitext-2 validation, calibration part" == data.CALIB_SOURCE
    with pytest.raises(LowbitError, match="enough for"):  # the dev part is not there to draw from
        calibration_windows(tok, None, str(fake_dir), n + 1, 16)
    session = Session(tiny_llama(), tok, data_dir=str(fake_dir), seq_len=32, calib=CalibOptions(n, 16))
    assert MARKER not in "".join(tok.decode(w) for w in session.calibration().tolist())


def test_the_hub_rows_rebuild_the_local_file(validation):
    rows = hub_rows(validation)
    assert len(rows) == 3760 and rows.count("") == 1299 and rows[1] == " = Homarus gammarus = \n"
    assert data.wikitext_from_rows(rows) == validation
    small = " \n = A = \n \n Words here . \n \n \n"
    assert hub_rows(small) == ["", " = A = \n", "", " Words here . \n", "", ""]
    assert data.wikitext_from_rows(hub_rows(small)) == small


def test_online_calibration_and_dev_are_the_same_wikitext_parts(validation, monkeypatch):
    asked = []

    def fake_rows(name, config, split, limit=None):
        asked.append((name, config, split))
        return [{"text": r} for r in hub_rows(validation)]

    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "fetch_hub_rows", fake_rows)
    calib, dev = data.split_validation(validation)
    assert data.calib_text() == calib and data.dev_text() == dev and data.eval_text(split="dev") == dev
    assert set(asked) == {("Salesforce/wikitext", "wikitext-2-v1", "validation")}  # never pile-val
    _, record = calibration_windows(byte_tokenizer(), None, None, 2, 64)
    assert record.source == data.CALIB_SOURCE


def test_pile_val_only_by_name_and_its_only_split(monkeypatch):
    """hub:mit-han-lab/pile-val-backup has only a validation split; without @SPLIT that is the one fetched."""
    calls = {}

    class Rows(list):
        def select(self, idx):
            return Rows(self[i] for i in idx)

        def to_list(self):
            return list(self)

    def load_dataset(name, config, split):
        calls["load"] = (name, config, split)
        return Rows({"text": f"pile document {i} " * 40, "meta": {}} for i in range(30))

    fake = types.SimpleNamespace(load_dataset=load_dataset,
                                 get_dataset_split_names=lambda name, config: ["validation"],
                                 logging=types.SimpleNamespace(set_verbosity_error=lambda: None))
    monkeypatch.setitem(sys.modules, "datasets", fake)
    _, record = calibration_windows(byte_tokenizer(), data.PILE_VAL, None, 4, 64)
    assert calls["load"] == ("mit-han-lab/pile-val-backup", None, "validation")
    assert record.source == data.PILE_VAL and record.kind == "hub-text" and record.documents == 30
    fake.get_dataset_split_names = lambda name, config: ["test", "train"]
    data.fetch_hub_rows("someone/text", None, None)
    assert calls["load"] == ("someone/text", None, "train")


def test_a_missing_local_file_is_one_error_naming_the_path(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(data, "fetch_hub_rows", lambda *a, **k: pytest.fail("no fall-back to the hub"))
    want = str(empty / "wikitext-2" / "valid.txt")
    for call in (lambda: data.calib_text(None, str(empty)), lambda: data.dev_text(str(empty)),
                 lambda: data.eval_text(None, str(empty), "dev"), lambda: check_source(None, str(empty)),
                 lambda: calibration_windows(byte_tokenizer(), None, str(empty), 1, 8)):
        with pytest.raises(LowbitError, match="data file not found") as e:
            call()
        assert want in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LowbitError, match=re.escape(str(empty / "wikitext-2-raw" / "wiki.test.raw"))):
        data.eval_text(None, str(empty))


def test_a_text_without_the_cut_is_not_taken_for_wikitext():
    with pytest.raises(LowbitError, match="appears 0 times"):
        data.split_validation(article("Something else", "words"))
    twice = fake_validation() + article(data.CUT_TITLE.strip(" ="), "again")
    with pytest.raises(LowbitError, match="appears 2 times"):
        data.split_validation(twice)


def test_a_session_scores_the_dev_part_and_says_so(fake_dir):
    from lowbit.eval.perplexity import tokenize_windows

    tok = byte_tokenizer()
    s = Session(tiny_llama(), tok, data_dir=str(fake_dir), seq_len=32, max_windows=3, split="dev")
    assert torch.equal(s.windows, tokenize_windows(tok, data.dev_text(str(fake_dir)), 32, 3))
    assert s.run("fp", None, progress=False).row()["data"] == "wikitext-2 validation, dev part"
    s = Session(tiny_llama(), tok, data_dir=str(fake_dir), seq_len=32, max_windows=1)
    assert s.run("fp", None, progress=False).row()["data"] == "wikitext-2 test"
    with pytest.raises(LowbitError, match="unknown evaluation split 'train'"):
        Session(tiny_llama(), tok, data_dir=str(fake_dir), split="train")


# --- command line --------------------------------------------------------------------------------------------


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """``lowbit ARGS`` in this process: (exit code, stdout, stderr)."""
    from lowbit.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert len(lines) == 1, err
    return lines[0]


def checkpoint(path: Path, model) -> Path:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_eval_split_dev_names_the_text_in_json(tmp_path, fake_dir, capsys):
    ckpt = checkpoint(tmp_path / "tiny", tiny_llama())
    common = ("--model", str(ckpt), "--data-dir", str(fake_dir), "--seq-len", "32", "--max-windows", "2", "--json")
    code, out, err = cli(capsys, "eval", *common, "--split", "dev")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["data"] == "wikitext-2 validation, dev part" and row["windows"] == 2
    row = json.loads(cli(capsys, "eval", *common)[1].strip().splitlines()[-1])
    assert row["data"] == "wikitext-2 test"
    other = tmp_path / "other.txt"
    other.write_text("Other words to score . " * 100)
    line = one_line_error(cli(capsys, "eval", *common, "--split", "dev", "--data", str(other)))
    assert "--split dev" in line and "give one" in line


def test_quantize_with_an_empty_data_dir_names_the_missing_file(tmp_path, capsys):
    ckpt = checkpoint(tmp_path / "tiny", tiny_llama())
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(cli(capsys, "quantize", "--model", str(ckpt), "--method", "awq", "--data-dir", str(empty),
                              "-o", str(tmp_path / "out")))
    assert str(empty / "wikitext-2" / "valid.txt") in line
    # RTN reads no calibration text and evaluates nothing here: the empty directory does not concern it
    code, _, err = cli(capsys, "quantize", "--model", str(ckpt), "--method", "rtn", "--group-size", "32",
                       "--data-dir", str(empty), "-o", str(tmp_path / "rtn"))
    assert code == 0, err


def tiny_opt_1024():
    """A tiny OPT: learned positions, 1024 of them, so a 2048-token window does not fit."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                    word_embed_proj_dim=64, max_position_embeddings=1024, pad_token_id=1, bos_token_id=0,
                    eos_token_id=2)
    return OPTForCausalLM(cfg).eval()


def test_positions_are_checked_only_for_the_windows_used(tmp_path, fake_dir, capsys):
    ckpt = checkpoint(tmp_path / "opt", tiny_opt_1024())
    base = ("--model", str(ckpt), "--data-dir", str(fake_dir))
    # quantize evaluates nothing: the default 2048-token --seq-len does not concern it
    code, _, err = cli(capsys, "quantize", *base, "--method", "rtn", "--group-size", "32", "-o", str(tmp_path / "rtn"),
                       "--json")
    assert code == 0, err
    code, _, err = cli(capsys, "quantize", *base, "--method", "awq", "--group-size", "32", "--calib-samples", "2",
                       "--calib-seq-len", "64", "--n-grid", "2", "-o", str(tmp_path / "awq"), "--json")
    assert code == 0, err
    # what it does use is checked: the calibration windows
    line = one_line_error(cli(capsys, "quantize", *base, "--method", "awq", "--calib-seq-len", "2048",
                              "-o", str(tmp_path / "long")))
    assert "2048-token calibration windows are longer than the model's 1024 positions" in line
    assert "--calib-seq-len of at most 1024" in line
    # eval scores 2048-token windows: refused in one line, naming --seq-len
    line = one_line_error(cli(capsys, "eval", *base, "--seq-len", "2048"))
    assert "2048-token evaluation windows are longer than the model's 1024 positions" in line
    assert "--seq-len of at most 1024" in line
    line = one_line_error(cli(capsys, "quantize", *base, "--method", "rtn", "--group-size", "32", "--eval",
                              "-o", str(tmp_path / "rtn2")))
    assert "evaluation windows" in line
