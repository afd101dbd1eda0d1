"""Bad data inputs get one line naming the file, row (or line) and field, and the fix: files that cannot be read as
they are (BOM, not UTF-8, a pretty-printed JSON syntax error), folders, tables whose columns change type, and
dataset mixtures (alignkit.core.data_files, alignkit.core.mixture, the handbook keys of alignkit.core.trl_names)."""

import json
from collections import Counter
from types import SimpleNamespace

import pytest

from alignkit.core.args import ConfigError, parse_config
from alignkit.core.config import DPOSettings
from alignkit.core.data import DataError, load_preferences, load_rows
from alignkit.core.mixture import check_mixture, load_train_eval
from alignkit.core.mixture_formats import mixture_from_mixer

GOOD = {"prompt": "name three fruits.", "chosen": "apple, pear, plum", "rejected": "red, blue, green"}
FIX = "Fix the row, or pass --skip_invalid to skip invalid rows."


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def prefs(tmp_path, n=8, name="prefs.jsonl", **bad):
    """n explicit preference rows; bad={index: changes}."""
    rows = [dict(GOOD, prompt=f"q{i}") for i in range(n)]
    for i, changes in bad.get("rows", {}).items():
        rows[i].update(changes)
    return jsonl(tmp_path / name, rows)


def settings(**values):
    """What load_train_eval reads of a script's settings."""
    base = dict(dataset_id=None, dataset_format="auto", dataset_split="train", dataset_config=None,
                dataset_test_split=None, dataset_mixture=None, skip_invalid=False, max_samples=None, eval_split=0.0,
                seed=42)
    return SimpleNamespace(**{**base, **values})


def mixture(*entries, **keys):
    return settings(dataset_mixture={"datasets": list(entries), **keys})


# ---------------------------------------------------------------- 1, 8, 12: mixture entries
def test_mixture_bad_row_is_named_by_its_file_and_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prefs(tmp_path, rows={1: {"rejected": ""}})
    with pytest.raises(DataError) as err:
        load_train_eval("preference", mixture({"id": "prefs.jsonl"}))
    assert str(err.value) == f"prefs.jsonl: row 2: field 'rejected': expected non-empty text, got str (''). {FIX}"


def test_mixture_weight_that_selects_no_rows(tmp_path):
    path = prefs(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_train_eval("preference", mixture({"id": str(path), "weight": 0.1}))
    assert str(err.value) == (f"dataset_mixture: dataset 1 ({path}): weight 0.1 selects no rows: 0.1 of its 8 rows is "
                              "less than one row. Raise it to at least 0.125, or drop the entry")


def test_mixture_test_split_size_that_leaves_no_training_rows(tmp_path):
    path = prefs(tmp_path, n=5)
    with pytest.raises(ConfigError) as err:
        load_train_eval("preference", mixture({"id": str(path)}, test_split_size=0.9))
    assert str(err.value) == ("dataset_mixture test_split_size 0.9 leaves no training rows: it holds out 5 of the 5 "
                              "rows. Hold out fewer (a smaller share, or fewer than 5 rows), or drop it")
    train, held_out = load_train_eval("preference", mixture({"id": str(path)}, test_split_size=0.2))
    assert (len(train), len(held_out)) == (4, 1)


def test_eval_split_share_counts_rows_as_train_test_split_does(tmp_path):
    path = prefs(tmp_path, n=5)
    with pytest.raises(ConfigError) as err:
        load_train_eval("preference", settings(dataset_id=str(path), eval_split=0.9))
    assert str(err.value) == ("eval_split 0.9 leaves no training rows: it holds out 5 of the 5 rows. Hold out fewer "
                              "(a smaller share, or fewer than 5 rows), or pass 0")
    train, held_out = load_train_eval("preference", settings(dataset_id=str(path), eval_split=0.05))
    assert (len(train), len(held_out)) == (4, 1)  # ceil(0.05 x 5): what datasets' train_test_split holds out


# ---------------------------------------------------------------- 7, 11, 12: check_mixture
@pytest.mark.parametrize("keys, message", [
    ({"columns": 5}, "dataset_mixture: dataset 1 (p.jsonl): columns 5 must be a list of column names, e.g. "
                     "columns: [prompt, chosen, rejected]"),
    ({"columns": "messages"}, "dataset_mixture: dataset 1 (p.jsonl): columns 'messages' must be a list of column "
                              "names, e.g. columns: [prompt, chosen, rejected]"),
    ({"weight": True}, "dataset_mixture: dataset 1 (p.jsonl): weight True must be a share in (0, 1]"),
    ({"test": "false"}, "dataset_mixture: dataset 1 (p.jsonl): test 'false' must be true (held out whole) or false"),
    ({"split": 1}, "dataset_mixture: dataset 1 (p.jsonl): split 1 must be a name, e.g. split: train"),
])
def test_check_mixture_entry_values(keys, message):
    with pytest.raises(ConfigError) as err:
        check_mixture({"datasets": [{"id": "p.jsonl", **keys}]})
    assert str(err.value) == message


@pytest.mark.parametrize("keys, message", [
    ({"seed": -1}, "dataset_mixture: seed -1 must be a whole number >= 0, e.g. seed: 42"),
    ({"seed": "abc"}, "dataset_mixture: seed 'abc' must be a whole number >= 0, e.g. seed: 42"),
    ({"test_split_size": float("nan")}, "dataset_mixture: test_split_size nan must be a share below 1, or a whole "
                                        "number of rows, e.g. test_split_size: 0.1"),
    ({"test_split_size": 1.5}, "dataset_mixture: test_split_size 1.5 must be a share below 1, or a whole number of "
                               "rows, e.g. test_split_size: 0.1"),
])
def test_check_mixture_seed_and_test_split_size(keys, message):
    with pytest.raises(ConfigError) as err:
        check_mixture({"datasets": [{"id": "p.jsonl"}], **keys})
    assert str(err.value) == message


# ---------------------------------------------------------------- 9: splits of a single file
def test_test_split_of_a_single_file_is_refused(tmp_path):
    path = prefs(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_train_eval("preference", settings(dataset_id=str(path), dataset_test_split="test"))
    assert str(err.value) == (f"--dataset_test_split test: {path} is a single file, which has no splits, so the "
                              "held-out rows would be the training rows. Hold out a share with --eval_split 0.05, or "
                              "put the rows in a folder as train.jsonl and test.jsonl (or use a Hub dataset with a "
                              "test split)")
    with pytest.raises(ConfigError) as err:
        load_train_eval("preference", settings(dataset_id=str(path), dataset_split="train_prefs"))
    assert str(err.value) == (f"--dataset_split train_prefs: {path} is a single file, which has no splits (the whole "
                              "file is the training data). Drop --dataset_split, or pass a folder or Hub dataset that "
                              "has a train_prefs split")
    with pytest.raises(ConfigError) as err:  # the handbook's dataset_mixer with its default splits, train and test
        load_train_eval("preference", settings(dataset_mixture=mixture_from_mixer({str(path): 1.0}, None, "x")))
    assert str(err.value) == (f"dataset_mixture: dataset 2 ({path}): split 'test', but a single file has no splits "
                              "(the whole file would be read). Drop the entry's split, and give held-out rows their "
                              "own file (an entry with test: true) or hold out a share with test_split_size (with "
                              "dataset_mixer, set dataset_splits: [train])")


def test_a_script_default_split_still_reads_a_file(tmp_path):
    from alignkit.core.config import SFTSettings

    path = jsonl(tmp_path / "sft.jsonl", [{"text": "one"}, {"text": "two"}])
    s = SFTSettings(dataset_id=str(path), eval_split=0, report_to="none")
    assert s.dataset_split == "train_sft"  # the default names the Hub dataset's split: a file ignores it
    assert len(load_train_eval("sft", s)[0]) == 2


def test_split_of_a_folder_is_read_from_its_files(tmp_path):
    (tmp_path / "data").mkdir()
    prefs(tmp_path / "data", n=3, name="train.jsonl")
    prefs(tmp_path / "data", n=2, name="test.jsonl")
    train, held_out = load_train_eval("preference", settings(dataset_id=str(tmp_path / "data"),
                                                              dataset_test_split="test"))
    assert (len(train), len(held_out)) == (3, 2)


# ---------------------------------------------------------------- 2: tables from rows (load_rows)
def test_load_rows_names_the_row_whose_type_differs(tmp_path):
    path = jsonl(tmp_path / "m.jsonl", [dict(GOOD, margin=1.5), {}, dict(GOOD, margin="high")])
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == (f"{path}: row 3: field 'margin': expected float as in row 1, got str ('high'); a column "
                              "holds one type in every row. Fix the row.")
    path = jsonl(tmp_path / "n.jsonl", [{"prompt": [{"role": "user", "content": "a"}]}, {"prompt": [{"role": 1}]}])
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == (f"{path}: row 2: field 'prompt': expected a value shaped like row 1's (list ([{{'role': "
                              "'user', 'content': 'a'}])), got list ([{'role': 1}]); a column holds one type in every "
                              "row. Fix the row.")
    (tmp_path / "ints.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_rows(tmp_path / "ints.json")
    assert str(err.value) == (f"{tmp_path / 'ints.json'}: row 1: expected an object with named fields, got int (1). "
                              "Fix the row.")


def test_load_rows_keeps_columns_the_first_row_lacks(tmp_path):
    data, _ = load_rows(jsonl(tmp_path / "p.jsonl", [{"a": 1}, {"a": 2, "b": "x"}]))
    assert data.to_list() == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_label_prompts_may_mix_text_and_messages(tmp_path):
    from alignkit.feedback.labeling import load_prompts

    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "hi there"}), json.dumps({"prompt": [{"role": "user", "content": "hello"}]}), "",
             json.dumps({"prompt": 5})]
    path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    run = SimpleNamespace(stats=Counter(), settings=SimpleNamespace(
        prompts=str(path), prompts_split="train", prompts_config=None, responses_a=None, responses_b=None,
        prompt_field="prompt", max_prompts=None))
    assert [p.messages for p in load_prompts(run)] == [[{"role": "user", "content": "hi there"}],
                                                       [{"role": "user", "content": "hello"}]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{path}: row 4: field 'prompt': expected non-empty text"):
        load_prompts(run)  # numbered by line, past the blank one


# ---------------------------------------------------------------- 3, 4, 5: reading files
def test_pretty_printed_json_error_names_its_own_line(tmp_path):
    path = tmp_path / "prefs.json"
    text = json.dumps([GOOD, dict(GOOD, prompt="b"), dict(GOOD, prompt="c")], indent=2)
    path.write_text(text.replace('"prompt": "c",', '"prompt": "c",,'), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value) == (f"{path}: line 13: invalid JSON (Expecting property name enclosed in double quotes at "
                              "column 19). Fix it there: the file must hold one JSON array of objects, or one JSON "
                              "object per line.")
    path.write_text(text[:-2] + ",\n]", encoding="utf-8")  # a trailing comma after the last object
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value) == (f"{path}: line 16: invalid JSON (a trailing comma before ']' at column 4). Fix it "
                              "there: the file must hold one JSON array of objects, or one JSON object per line.")


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path / "p.csv").write_text("\ufeffprompt,chosen,rejected\nname fruits,apple,red\n", encoding="utf-8")
    (tmp_path / "p.jsonl").write_text("\ufeff" + json.dumps(GOOD) + "\n", encoding="utf-8")
    for name in ("p.csv", "p.jsonl"):
        assert load_rows(tmp_path / name)[0].column_names == ["prompt", "chosen", "rejected"]
        assert len(load_preferences(tmp_path / name)) == 1


@pytest.mark.parametrize("name, content, says", [
    ("p.jsonl", json.dumps(GOOD).encode() + b"\n" + json.dumps(dict(GOOD, prompt="caf\u00e9"),
                                                              ensure_ascii=False).encode("latin-1") + b"\n",
     "line 2: not UTF-8 text (byte 0xe9 at column 16). Save the file as UTF-8."),
    ("p.csv", b"prompt,chosen\ncaf\xe9,a\n",  # Excel's Save As offers the fix by that name
     "line 2: not UTF-8 text (byte 0xe9 at column 4). Save the file as UTF-8 (in Excel: CSV UTF-8)."),
    ("p.csv", b"prompt,chosen,rejected\nq,a, b,c\n",  # rows by their line, the header's is 1 (as in Excel)
     "row 2: 4 values, but the header names 3 columns. Fix the row (quote a value that holds a comma)."),
    ("p.csv", b"prompt,chosen,rejected\nq,a,b\nq,,b\n",  # an empty field: missing, in the row an editor shows
     "row 3: field 'chosen': expected non-empty text"),
    ("p.csv", b"prompt,chosen,rejected\nq,\"a\nb\",c\n\nq,,b\n",  # a row on lines 2-3, a blank line: by its first line
     "row 5: field 'chosen': expected non-empty text"),
], ids=["not utf-8", "csv not utf-8", "csv row longer than its header", "csv row by its line", "csv rows by first line"])
def test_a_file_that_cannot_be_read_names_its_line_and_the_fix(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value).startswith(f"{path}: {says}"), str(err.value)


# ---------------------------------------------------------------- 6: folders
def test_folder_files_with_different_columns(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    jsonl(folder / "a.jsonl", [GOOD])
    jsonl(folder / "b.jsonl", [{"question": "q", "x": 1}])
    with pytest.raises(DataError) as err:
        load_preferences(folder)
    assert str(err.value) == (f"{folder}: the folder's files hold different columns: {folder}/a.jsonl has prompt, "
                              f"chosen, rejected; {folder}/b.jsonl has question, x. Give every file the same columns, "
                              "or load the files apart (e.g. one dataset_mixture entry each).")


def test_folder_without_data_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("hello\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_preferences(tmp_path / "d")
    assert str(err.value) == (f"{tmp_path / 'd'}: the folder holds no .json, .jsonl, .parquet, .csv data files (it "
                              "holds notes.md). Put the rows in such a file, or pass the data file itself.")


def test_folder_rows_are_named_by_their_file(tmp_path):
    (tmp_path / "d").mkdir()
    prefs(tmp_path / "d", n=3, name="a.jsonl")
    prefs(tmp_path / "d", n=3, name="b.jsonl", rows={1: {"rejected": ""}})
    with pytest.raises(DataError) as err:
        load_preferences(tmp_path / "d")
    assert str(err.value) == (f"{tmp_path / 'd' / 'b.jsonl'}: row 2: field 'rejected': expected non-empty text, got "
                              f"str (''). {FIX}")
    assert len(load_preferences(tmp_path / "d", skip_invalid=True)) == 5


# ---------------------------------------------------------------- 10: the handbook's dataset_mixer / dataset_splits
@pytest.mark.parametrize("recipe, message", [
    ("dataset_mixer:\n  foo/bar: abc\n", "{path}: key dataset_mixer: the fraction of foo/bar is 'abc'; dataset_mixer "
     "maps each dataset id to a fraction in (0, 1] of its train split, e.g. {{foo/bar: 0.5}}"),
    ("dataset_mixer:\n  foo/bar: 1.0\ndataset_splits: 5\n", "{path}: key dataset_splits: dataset_splits 5 must be a "
     "split name or a list of them, e.g. [train_prefs, test_prefs]"),
])
def test_handbook_mixer_values_in_a_recipe(tmp_path, recipe, message):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        parse_config(DPOSettings, args=["--config", str(path)], env_file=None)
    assert str(err.value) == message.format(path=path)


def test_handbook_mixer_on_the_command_line():
    with pytest.raises(ConfigError) as err:
        parse_config(DPOSettings, args=["--dataset_mixer", "{bad"], env_file=None)
    assert str(err.value) == ("invalid value for --dataset_mixer: not valid JSON (Expecting property name enclosed in "
                              "double quotes: line 1 column 2 (char 1)); pass a JSON object of dataset id: fraction, "
                              "e.g. '{\"HuggingFaceH4/ultrafeedback_binarized\": 1.0}'")
    s = parse_config(DPOSettings, args=["--dataset_mixer", "foo/bar", "--dataset_splits", "train_prefs", "test_prefs"],
                     env_file=None)
    assert s.dataset_mixture["datasets"] == [{"id": "foo/bar", "split": "train_prefs", "weight": 1.0},
                                             {"id": "foo/bar", "split": "test_prefs", "test": True}]


def test_a_mistyped_dataset_under_dataset_test_split_auto_says_it_is_no_local_folder(tmp_path, monkeypatch):
    """A TRL line's dataset_test_split auto lists the dataset's splits before reading it: a typo'd local folder
    (data/pairz, shaped like a Hub id) said only "cannot list its splits as a Hugging Face Hub dataset"."""
    monkeypatch.chdir(tmp_path)
    s = DPOSettings(dataset_id="data/pairz", dataset_test_split="auto", report_to="none")
    with pytest.raises(DataError, match=r"^data/pairz: no such local file or folder, and listing its splits as a "
                                        r"Hugging Face Hub dataset failed: "):
        load_train_eval("preference", s)


def test_a_mixture_that_is_not_json_gets_a_mixture_s_example():
    """--dataset_mixture '{bad' was answered with the example of --trainer_overrides ('{"optim": ...}')."""
    with pytest.raises(ConfigError, match=r"^invalid value for --dataset_mixture: not valid JSON .*; pass a JSON "
                                          r"object, e\.g\. '\{\"datasets\": \[\{\"id\": "):
        parse_config(DPOSettings, args=["--dataset_mixture", "{bad"], env_file=None)
    with pytest.raises(ConfigError, match=r"e\.g\. '\{\"optim\": \"paged_adamw_8bit\"\}'"):
        parse_config(DPOSettings, args=["--trainer_overrides", "{bad"], env_file=None)


def test_a_row_error_survives_pickle_and_copy_as_made():
    """RowInvalid keeps its reason apart from its fix (--skip_invalid reports the reason alone); pickled or copied it
    ran its whole message through the constructor again ("... Fix it. Fix the row."), found by the session's review."""
    import copy
    import pickle

    from alignkit.core.data_files import RowInvalid

    error = RowInvalid("f.jsonl: row 1: field 'prompt': bad.", "Fix it.")
    for again in (pickle.loads(pickle.dumps(error)), copy.copy(error)):
        assert (str(again), again.reason) == ("f.jsonl: row 1: field 'prompt': bad. Fix it.",
                                              "f.jsonl: row 1: field 'prompt': bad.")
