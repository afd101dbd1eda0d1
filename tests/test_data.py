"""Tests for alignkit.core.data: every supported dataset shape, every file type, and the row-level errors users see."""

import copy
import csv
import json
import logging
import re

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trl.data_utils import is_conversational

from alignkit.core import data as D
from alignkit.core.data import DataError, detect_format, load_preferences, load_rows, load_sft
from conftest import ROOT


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


def write(tmp_path, rows, ext, name="data"):
    """Write rows as <name>.<ext>: json = one array, jsonl = one object per line."""
    path = tmp_path / f"{name}.{ext}"
    if ext == "json":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif ext == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif ext == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif ext == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


# ------------------------------------------------------------------------------ real-shaped rows per format
# argilla/ultrafeedback-binarized-preferences-cleaned: string prompt + full [user, assistant] conversations.
ARGILLA_UF = [
    {"source": "evol_instruct", "prompt": "Name three primary colors.",
     "chosen": [u("Name three primary colors."), a("Red, yellow and blue are the traditional primary colors.")],
     "chosen-rating": 5.0, "chosen-model": "gpt-4",
     "rejected": [u("Name three primary colors."), a("Green.")], "rejected-rating": 2.0, "rejected-model": "alpaca-7b"},
    {"source": "flan_v2_niv2", "prompt": "Translate to French: good morning",
     "chosen": [u("Translate to French: good morning"), a("Bonjour.")], "chosen-rating": 4.5, "chosen-model": "wizardlm-70b",
     "rejected": [u("Translate to French: good morning"), a("Buenos días.")], "rejected-rating": 1.0,
     "rejected-model": "falcon-40b-instruct"},
]
ARGILLA_UF_OUT = [
    {"prompt": [u("Name three primary colors.")], "chosen": [a("Red, yellow and blue are the traditional primary colors.")],
     "rejected": [a("Green.")]},
    {"prompt": [u("Translate to French: good morning")], "chosen": [a("Bonjour.")], "rejected": [a("Buenos días.")]},
]
# HuggingFaceH4/ultrafeedback_binarized: prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected.
H4_UF = [
    {"prompt": "How many legs does a spider have?", "prompt_id": "4f1c0e",
     "chosen": [u("How many legs does a spider have?"), a("Spiders have eight legs.")],
     "rejected": [u("How many legs does a spider have?"), a("Spiders have six legs, like all insects.")],
     "messages": [u("How many legs does a spider have?"), a("Spiders have eight legs.")],
     "score_chosen": 9.0, "score_rejected": 3.0},
]
H4_UF_OUT = [{"prompt": [u("How many legs does a spider have?")], "chosen": [a("Spiders have eight legs.")],
              "rejected": [a("Spiders have six legs, like all insects.")]}]
# argilla/distilabel-capybara-dpo-7k-binarized: `prompt` is only the first user turn of multi-turn conversations.
CAPYBARA = [
    {"source": "Know-Logic", "prompt": "Which planet is closest to the sun?",
     "chosen": [u("Which planet is closest to the sun?"), a("Mercury."), u("How long is its year?"),
                a("About 88 Earth days.")], "chosen_rating": 5, "chosen_model": "gpt-4-1106-preview",
     "rejected": [u("Which planet is closest to the sun?"), a("Mercury."), u("How long is its year?"),
                  a("365 days, like ours.")], "rejected_rating": 1, "rejected_model": "mistral-7b-instruct-v0.2"},
]
CAPYBARA_OUT = [{"prompt": [u("Which planet is closest to the sun?"), a("Mercury."), u("How long is its year?")],
                 "chosen": [a("About 88 Earth days.")], "rejected": [a("365 days, like ours.")]}]
# jondurbin/truthy-dpo style: flat strings (also what a hand-written CSV looks like).
EXPLICIT_STR = [
    {"id": "04c275bf", "source": "truthy_dpo", "prompt": "Can you feel the sun on your skin?",
     "chosen": "No, I am an AI and have no body, so I cannot feel sunlight.",
     "rejected": "Yes, it feels warm and pleasant this afternoon."},
    {"id": "a3bc0b53", "source": "truthy_dpo", "prompt": "Do bulls get angry at the colour red?",
     "chosen": "No. Bulls are red-green colour-blind; they react to the movement of the cape.",
     "rejected": "Yes, red makes bulls furious."},
]
# TRL's standard format: texts stay texts (TRL joins them as plain text, no chat template).
EXPLICIT_STR_OUT = [{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in EXPLICIT_STR]
# alignkit's own labelled output: message lists plus judge metadata.
LABELLED = [
    {"prompt": [s("You are a concise assistant."), u("What is 2 + 2?")], "chosen": [a("4")], "rejected": [a("22")],
     "judge": "Qwen/Qwen2.5-7B-Instruct", "template": "pairwise_v1",
     "verdicts": [{"order": "AB", "winner": "A"}, {"order": "BA", "winner": "B"}]},
]
LABELLED_OUT = [{"prompt": [s("You are a concise assistant."), u("What is 2 + 2?")], "chosen": [a("4")],
                 "rejected": [a("22")]}]
# trl-lib/ultrafeedback_binarized: chosen/rejected full conversations, no prompt column; second row multi-turn.
UF = [
    {"chosen": [u("Write a haiku about autumn."), a("Crisp leaves drift and fall / ...")],
     "rejected": [u("Write a haiku about autumn."), a("Autumn is a season.")], "score_chosen": 8.5, "score_rejected": 4.0},
    {"chosen": [s("You are a helpful tutor."), u("What is a prime number?"),
                a("A whole number above 1 divisible only by 1 and itself."), u("Is 1 prime?"),
                a("No. 1 has only one divisor, so it is not prime.")],
     "rejected": [s("You are a helpful tutor."), u("What is a prime number?"),
                  a("A whole number above 1 divisible only by 1 and itself."), u("Is 1 prime?"), a("Yes.")],
     "score_chosen": 9.0, "score_rejected": 2.0},
]
UF_OUT = [
    {"prompt": [u("Write a haiku about autumn.")], "chosen": [a("Crisp leaves drift and fall / ...")],
     "rejected": [a("Autumn is a season.")]},
    {"prompt": [s("You are a helpful tutor."), u("What is a prime number?"),
                a("A whole number above 1 divisible only by 1 and itself."), u("Is 1 prime?")],
     "chosen": [a("No. 1 has only one divisor, so it is not prime.")], "rejected": [a("Yes.")]},
]
# Anthropic/hh-rlhf: two full transcripts; second row multi-turn.
HH = [
    {"chosen": "\n\nHuman: What are some cuss words in english?\n\nAssistant: I'd rather not list those.",
     "rejected": "\n\nHuman: What are some cuss words in english?\n\nAssistant: Here is a long list of them."},
    {"chosen": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then knead."
               "\n\nHuman: How long should it rise?\n\nAssistant:  About an hour, until doubled in size. ",
     "rejected": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then knead."
                 "\n\nHuman: How long should it rise?\n\nAssistant: Two days."},
]
HH_OUT = [
    {"prompt": [u("What are some cuss words in english?")], "chosen": [a("I'd rather not list those.")],
     "rejected": [a("Here is a long list of them.")]},
    {"prompt": [u("How do I bake bread?"), a("Mix flour, water, yeast and salt, then knead."),
                u("How long should it rise?")],
     "chosen": [a("About an hour, until doubled in size.")], "rejected": [a("Two days.")]},
]
# HH already split as the DPO reference code (and split copies of Anthropic/hh-rlhf) cut it: the prompt is the
# transcript through its last "\n\nAssistant:", each answer the text after it (with its leading space).
HH_SPLIT = [
    {"prompt": "\n\nHuman: What are some cuss words in english?\n\nAssistant:",
     "chosen": " I'd rather not list those.", "rejected": " Here is a long list of them."},
    {"prompt": "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour, water, yeast and salt, then knead."
               "\n\nHuman: How long should it rise?\n\nAssistant:",
     "chosen": "  About an hour, until doubled in size. ", "rejected": " Two days."},
]
# stanfordnlp/SHP: labels 1 = A preferred, 0 = B preferred.
SHP = [
    {"post_id": "himc90", "domain": "askculinary_train", "upvote_ratio": 0.99,
     "history": "Why does my cast iron pan rust after washing?", "c_root_id_A": "fv2k1a", "c_root_id_B": "fv1zy8",
     "created_at_utc_A": 1593535113, "created_at_utc_B": 1593532117, "score_A": 24, "score_B": 6,
     "human_ref_A": "Dry it on the stove right after washing and wipe on a thin coat of oil.",
     "human_ref_B": "Just buy stainless steel.", "labels": 1, "seconds_difference": 2996.0, "score_ratio": 4.0},
    {"post_id": "k3pq2z", "domain": "askphysics_train", "upvote_ratio": 0.95,
     "history": "Why is the sky blue?", "c_root_id_A": "ge3a1b", "c_root_id_B": "ge3c9d",
     "created_at_utc_A": 1606435200, "created_at_utc_B": 1606438800, "score_A": 3, "score_B": 41,
     "human_ref_A": "Because it reflects the ocean.",
     "human_ref_B": "Rayleigh scattering: shorter (blue) wavelengths scatter more in the atmosphere.",
     "labels": 0, "seconds_difference": 3600.0, "score_ratio": 13.67},
]
SHP_OUT = [
    {"prompt": [u("Why does my cast iron pan rust after washing?")],
     "chosen": [a("Dry it on the stove right after washing and wipe on a thin coat of oil.")],
     "rejected": [a("Just buy stainless steel.")]},
    {"prompt": [u("Why is the sky blue?")],
     "chosen": [a("Rayleigh scattering: shorter (blue) wavelengths scatter more in the atmosphere.")],
     "rejected": [a("Because it reflects the ocean.")]},
]


def _se_answer(answer_id, score, text, selected=False):
    return {"answer_id": answer_id, "author": f"user{answer_id}", "author_id": answer_id,
            "author_profile": f"https://stackoverflow.com/users/{answer_id}", "pm_score": score,
            "selected": selected, "text": text}


# HuggingFaceH4/stack-exchange-preferences.
STACK = [
    {"qid": 11, "question": "<p>How do I reverse a list in Python?</p>",
     "answers": [_se_answer(101, 4, "<p>Use <code>reversed(xs)</code>.</p>"),
                 _se_answer(102, 12, "<p>Use <code>xs[::-1]</code> or <code>xs.reverse()</code>.</p>", True),
                 _se_answer(103, -1, "<p>Write a for loop.</p>")],
     "date": "2008/08/01", "metadata": ["https://stackoverflow.com/questions/11"]},
]
STACK_OUT = [{"prompt": [u("<p>How do I reverse a list in Python?</p>")],
              "chosen": [a("<p>Use <code>xs[::-1]</code> or <code>xs.reverse()</code>.</p>")],
              "rejected": [a("<p>Write a for loop.</p>")]}]
# Self-reference feedback (Bao et al. 2024): message / chose / reject.
SELFREF = [
    {"message": "Give me one tip for better sleep.", "chose": "Keep a fixed wake-up time, even on weekends.",
     "reject": "Drink coffee before bed."},
    {"message": "Summarise the plot of Hamlet in one sentence.",
     "chose": "A Danish prince avenges his father's murder by his uncle, at the cost of nearly everyone's life.",
     "reject": "Hamlet is a play."},
]
SELFREF_OUT = [
    {"prompt": [u("Give me one tip for better sleep.")], "chosen": [a("Keep a fixed wake-up time, even on weekends.")],
     "rejected": [a("Drink coffee before bed.")]},
    {"prompt": [u("Summarise the plot of Hamlet in one sentence.")],
     "chosen": [a("A Danish prince avenges his father's murder by his uncle, at the cost of nearly everyone's life.")],
     "rejected": [a("Hamlet is a play.")]},
]
SELFREF_MSGS = [{"message": [s("Answer briefly."), u("Capital of Japan?")], "chose": "Tokyo.", "reject": "Kyoto."}]
SELFREF_MSGS_OUT = [{"prompt": [s("Answer briefly."), u("Capital of Japan?")], "chosen": [a("Tokyo.")],
                     "rejected": [a("Kyoto.")]}]

# SFT: HuggingFaceH4/ultrachat_200k (prompt, prompt_id, messages).
ULTRACHAT = [
    {"prompt": "What is photosynthesis?", "prompt_id": "9a1b",
     "messages": [u("What is photosynthesis?"), a("The process plants use to turn light, water and CO2 into sugar."),
                  u("Where does it happen?"), a("In the chloroplasts.")]},
]
ULTRACHAT_OUT = [{"messages": ULTRACHAT[0]["messages"]}]
# teknium/OpenHermes-2.5 style ShareGPT, with an empty system turn and per-turn weight.
SHAREGPT = [
    {"custom_instruction": None, "topic": None, "model_name": None, "source": "airoboros2.2",
     "conversations": [{"from": "system", "value": "", "weight": None},
                       {"from": "human", "value": "Every day a tree drops 7 leaves. How many after 4 weeks?", "weight": 0.0},
                       {"from": "gpt", "value": "4 weeks is 28 days, so 7 * 28 = 196 leaves.", "weight": 1.0}]},
    {"custom_instruction": None, "topic": None, "model_name": None, "source": "CamelAI",
     "conversations": [{"from": "system", "value": "You are a chemistry tutor.", "weight": None},
                       {"from": "human", "value": "What is the pH of pure water?", "weight": 0.0},
                       {"from": "gpt", "value": "7 at 25 degrees Celsius.", "weight": 1.0}]},
]
SHAREGPT_OUT = [
    {"messages": [u("Every day a tree drops 7 leaves. How many after 4 weeks?"),
                  a("4 weeks is 28 days, so 7 * 28 = 196 leaves.")]},
    {"messages": [s("You are a chemistry tutor."), u("What is the pH of pure water?"), a("7 at 25 degrees Celsius.")]},
]
# trl-lib/tldr style prompt/completion strings.
PROMPT_COMPLETION = [
    {"prompt": "SUBREDDIT: r/relationships\nTITLE: Friend keeps cancelling plans\nPOST: ...\nTL;DR:",
     "completion": " My friend cancels every time; should I stop inviting her?"},
]
PROMPT_COMPLETION_OUT = [  # TRL's standard format: texts, as they are (the completion's leading space too)
    {"prompt": "SUBREDDIT: r/relationships\nTITLE: Friend keeps cancelling plans\nPOST: ...\nTL;DR:",
     "completion": " My friend cancels every time; should I stop inviting her?"},
]
PROMPT_COMPLETION_MSGS = [{"prompt": [s("Be brief."), u("Say hi.")], "completion": [a("Hi!")]}]
# timdettmers/openassistant-guanaco style plain text.
TEXT = [{"text": "### Human: Can you write a short poem?### Assistant: Roses are red, violets are blue."},
        {"text": "### Human: Hello### Assistant: Hi! How can I help?"}]

PREF_CASES = [  # (case id, format, rows, expected, file types)
    ("argilla_uf", "explicit", ARGILLA_UF, ARGILLA_UF_OUT, ["json", "jsonl", "parquet"]),
    ("h4_uf", "explicit", H4_UF, H4_UF_OUT, ["json", "jsonl", "parquet"]),
    ("capybara_multiturn", "explicit", CAPYBARA, CAPYBARA_OUT, ["json", "jsonl", "parquet"]),
    ("explicit_strings", "explicit", EXPLICIT_STR, EXPLICIT_STR_OUT, ["json", "jsonl", "parquet", "csv"]),
    ("labelled_output", "explicit", LABELLED, LABELLED_OUT, ["json", "jsonl", "parquet"]),
    ("ultrafeedback", "ultrafeedback", UF, UF_OUT, ["json", "jsonl", "parquet"]),
    ("hh", "hh", HH, HH_OUT, ["json", "jsonl", "parquet", "csv"]),
    ("hh_split", "explicit", HH_SPLIT, HH_OUT, ["json", "jsonl", "parquet", "csv"]),
    ("shp", "shp", SHP, SHP_OUT, ["json", "jsonl", "parquet", "csv"]),
    ("stack_exchange", "stack_exchange", STACK, STACK_OUT, ["json", "jsonl", "parquet"]),
    ("self_reference", "self_reference", SELFREF, SELFREF_OUT, ["json", "jsonl", "parquet", "csv"]),
    ("self_reference_msgs", "self_reference", SELFREF_MSGS, SELFREF_MSGS_OUT, ["json", "jsonl", "parquet"]),
]
SFT_CASES = [
    ("ultrachat", "messages", ULTRACHAT, ULTRACHAT_OUT, ["json", "jsonl", "parquet"]),
    ("sharegpt", "sharegpt", SHAREGPT, SHAREGPT_OUT, ["json", "jsonl", "parquet"]),
    ("prompt_completion", "prompt_completion", PROMPT_COMPLETION, PROMPT_COMPLETION_OUT,
     ["json", "jsonl", "parquet", "csv"]),
    ("prompt_completion_msgs", "prompt_completion", PROMPT_COMPLETION_MSGS, PROMPT_COMPLETION_MSGS, ["json", "jsonl"]),
    ("text", "text", TEXT, TEXT, ["json", "jsonl", "parquet", "csv"]),
]


def _expand(cases):
    return [pytest.param(fmt, rows, out, ext, named, id=f"{cid}-{ext}-{'named' if named else 'auto'}")
            for cid, fmt, rows, out, exts in cases for ext in exts for named in (False, True)]


@pytest.mark.parametrize("fmt, rows, expected, ext, named", _expand(PREF_CASES))
def test_preference_formats(tmp_path, fmt, rows, expected, ext, named):
    path = write(tmp_path, rows, ext)
    ds = load_preferences(str(path), format=fmt if named else "auto")
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    assert ds.to_list() == expected
    # TRL's own test decides the format: conversational but for its standard texts, kept as they are
    assert all(is_conversational(row) == (not isinstance(want["prompt"], str)) for row, want in zip(ds, expected))


@pytest.mark.parametrize("fmt, rows, expected, ext, named", _expand(SFT_CASES))
def test_sft_formats(tmp_path, fmt, rows, expected, ext, named):
    path = write(tmp_path, rows, ext)
    ds = load_sft(path, format=fmt if named else "auto")
    assert ds.to_list() == expected
    assert ds.column_names == list(expected[0])
    assert is_conversational(ds[0]) == (fmt != "text" and not isinstance(expected[0].get("prompt"), str))


@pytest.mark.parametrize("cid, fmt, rows, expected, exts", PREF_CASES, ids=[c[0] for c in PREF_CASES])
def test_detect_format_preference(cid, fmt, rows, expected, exts):
    assert detect_format(rows[0], "preference") == fmt
    # a Dataset's features tell hh (string) from ultrafeedback (message list) without reading rows
    assert detect_format(datasets.Dataset.from_list(rows).features, "preference") == fmt


def test_detect_format_sft_and_names():
    assert detect_format(["prompt", "prompt_id", "messages"], "sft") == "messages"
    assert detect_format(["conversations", "source"], "sft") == "sharegpt"
    assert detect_format(["prompt", "completion"], "sft") == "prompt_completion"
    assert detect_format(["text", "label"], "sft") == "text"
    assert detect_format(["history", "human_ref_A", "human_ref_B", "labels", "score_A"], "preference") == "shp"
    assert detect_format(["prompt", "chosen", "rejected", "messages"], "preference") == "explicit"
    with pytest.raises(DataError, match="hh.*ultrafeedback|ultrafeedback.*hh"):
        detect_format(["chosen", "rejected"], "preference")  # names alone cannot tell strings from lists
    # A misspelt column is named with the one it was meant to be (it said only that no format fits).
    with pytest.raises(DataError, match=r"\[prompt, chosen, rejekted\]\. Rename rejekted \(did you mean rejected\?\), or"):
        detect_format(["prompt", "chosen", "rejekted"], "preference")
    # Rows of another script's kind: that script named (the near-name hint said to rename KTO's 'label' to SHP's
    # 'labels', or to train on the pairs' prompts as plain text).
    for columns, kind, says in ((["prompt", "completion", "label"], "preference", "kto.py trains on them"),
                                (["prompt", "chosen", "rejected"], "sft", "dpo.py, reward.py"),
                                (["prompt", "completions", "labels"], "sft", "stepwise supervision")):
        with pytest.raises(DataError, match=f"^d.jsonl: .*{says}") as err:
            detect_format(columns, kind, "d.jsonl")
        assert "did you mean" not in str(err.value) and "dataset_text_field" not in str(err.value)


def test_in_memory_sources(tmp_path):
    assert load_preferences(HH).to_list() == HH_OUT
    assert load_preferences(datasets.Dataset.from_list(UF)).to_list() == UF_OUT
    assert load_sft(datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT)})).to_list() == TEXT
    # a folder written by save_to_disk, and a folder holding data files
    datasets.Dataset.from_list(SHP).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(tmp_path / "saved").to_list() == SHP_OUT
    (tmp_path / "files").mkdir()
    write(tmp_path / "files", SHAREGPT, "jsonl", name="train")
    assert load_sft(tmp_path / "files").to_list() == SHAREGPT_OUT


def test_load_rows_labels_and_types(tmp_path):
    path = write(tmp_path, EXPLICIT_STR, "csv")
    ds, label = load_rows(str(path))
    assert label == str(path) and ds.column_names == ["id", "source", "prompt", "chosen", "rejected"]
    ds, label = load_rows(SHP)
    assert len(ds) == 2 and ds[1]["labels"] == 0


def test_hub_id_goes_to_load_dataset(monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.Dataset.from_list(HH[:1] + [{"chosen": "oops", "rejected": HH[0]["rejected"]}])

    monkeypatch.setattr(D.datasets, "load_dataset", fake_load_dataset)
    ds, label = load_rows("Anthropic/hh-rlhf", split="test", config_name="harmless-base")
    assert calls == [(("Anthropic/hh-rlhf", "harmless-base"), {"split": "test"})]
    assert "Anthropic/hh-rlhf" in label and "harmless-base" in label and "test" in label
    with pytest.raises(DataError) as err:
        load_preferences("Anthropic/hh-rlhf", split="test")
    assert "Anthropic/hh-rlhf (split test): row 2: field 'chosen'" in str(err.value)


def test_hub_failure_is_a_data_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(D.datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"^someone/prefs \(split train\): no such local file .*offline"):
        load_preferences("someone/prefs")


def test_source_errors(tmp_path):
    (tmp_path / "prefs.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_rows(tmp_path / "prefs.txt")
    with pytest.raises(DataError, match="no split 'train'; the splits are test"):
        load_sft(datasets.DatasetDict({"test": datasets.Dataset.from_list(TEXT)}))
    with pytest.raises(DataError, match="unsupported data source of type int"):
        load_rows(42)


def test_a_folder_without_the_split_says_how_to_name_one_that_the_library_reads(tmp_path):
    """A folder of train_prefs.jsonl and test_prefs.jsonl, asked for train_prefs, was told to "name a file after
    the split (e.g. train_prefs.jsonl)": the file it has, which the datasets library reads as the split train."""
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}]
    folder = tmp_path / "prefs"
    folder.mkdir()
    for name in ("train_prefs", "test_prefs"):
        write(folder, rows, "jsonl", name)
    with pytest.raises(DataError) as refused:
        load_preferences(str(folder), split="train_prefs")
    assert str(refused.value) == (
        f"{folder}: no split 'train_prefs'; the folder's files make the split(s) train, test. train_prefs.jsonl is "
        "the split 'train': a file name that starts with train, test or validation makes that split. Pass one of "
        "them, or name the file data/train_prefs-00000-of-00001.jsonl (how the datasets library names any other "
        "split).")
    (folder / "data").mkdir()
    for name in ("train_prefs", "test_prefs"):  # as the line says: now the splits the handbook names
        (folder / f"{name}.jsonl").rename(folder / "data" / f"{name}-00000-of-00001.jsonl")
    assert len(load_preferences(str(folder), split="train_prefs")) == 1
    with pytest.raises(DataError, match=r"no split 'validation'.* Pass one of them, or name a file after the split "
                                        r"\(e.g. validation.jsonl\)\.$"):
        load_preferences(str(folder), split="validation")


def test_missing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(D.datasets, "load_dataset", lambda *a, **k: pytest.fail("must not query the Hub"))
    for missing in [str(tmp_path / "nope.jsonl"), "data/prefs.jsonl", "prefs.csv"]:
        with pytest.raises(DataError, match="not found") as err:
            load_preferences(missing)
        assert missing in str(err.value)


# ------------------------------------------------------------------------------------------------ bad rows
def _with(rows, index, **changes):
    rows = copy.deepcopy(rows)
    rows[index].update(changes)
    return rows


BAD_PREF = [  # (id, rows, format, bad row number, field, text expected in the message)
    ("int", _with(EXPLICIT_STR, 1, chosen=42), "explicit", 2, "chosen", "got int (42)"),
    ("missing", _with(EXPLICIT_STR, 1, rejected=None), "explicit", 2, "rejected", "missing or null"),
    ("empty", _with(EXPLICIT_STR, 0, prompt="  "), "explicit", 1, "prompt", "expected non-empty text, got str ('  ')"),
    ("no_role", _with(LABELLED, 0, chosen=[{"content": "4"}]), "explicit", 1, "chosen", "message 1: expected 'role'"),
    ("bad_role", _with(LABELLED, 0, prompt=[{"role": "bot", "content": "hi"}]), "explicit", 1, "prompt", "'bot'"),
    ("no_content", _with(LABELLED, 0, rejected=[{"role": "assistant"}]), "explicit", 1, "rejected", "'content'"),
    ("ends_user", _with(LABELLED, 0, chosen=[u("4")]), "explicit", 1, "chosen",
     "ending with an assistant turn, got a last turn with role 'user'"),
    ("same", _with(EXPLICIT_STR, 1, rejected=EXPLICIT_STR[1]["chosen"]), "explicit", 2, "rejected", "identical"),
    ("prefix", _with(ARGILLA_UF, 1, chosen=[u("Something else"), a("Bonjour.")]), "explicit", 2, "chosen",
     "starts with the prompt"),
    ("uf_str", _with(UF, 1, chosen="just text"), "ultrafeedback", 2, "chosen", "list of messages"),
    ("uf_diverge", _with(UF, 0, rejected=[u("Another question"), a("x")]), "ultrafeedback", 1, "rejected",
     "same turns"),
    ("uf_no_prompt", _with(UF, 0, chosen=[a("a")], rejected=[a("b")]), "ultrafeedback", 1, "chosen", "prompt turns"),
    ("hh_unparsable", _with(HH, 1, chosen="I like turtles"), "hh", 2, "chosen", "transcript"),
    ("hh_ends_human", _with(HH, 0, rejected="\n\nHuman: hi\n\nAssistant: hey\n\nHuman: and?"), "hh", 1, "rejected",
     "ending with an Assistant turn"),
    ("hh_empty_answer", _with(HH, 0, chosen="\n\nHuman: What are some cuss words in english?\n\nAssistant:"), "hh", 1,
     "chosen", "turn 2 (Assistant): expected non-empty text"),
    ("hh_prompts_differ", _with(HH, 1, rejected="\n\nHuman: Different\n\nAssistant: Two days."), "hh", 2, "rejected",
     "same conversation"),
    ("shp_label", _with(SHP, 1, labels=2), "shp", 2, "labels", "got int (2)"),
    ("shp_same", _with(SHP, 0, human_ref_B=SHP[0]["human_ref_A"]), "shp", 1, "human_ref_B", "identical"),
    ("se_one", _with(STACK, 0, answers=STACK[0]["answers"][:1]), "stack_exchange", 1, "answers", "at least 2"),
    ("se_tie", _with(STACK, 0, answers=[_se_answer(1, 3, "x"), _se_answer(2, 3, "y")]), "stack_exchange", 1,
     "answers", "different pm_score"),
    ("selfref", _with(SELFREF, 1, reject=None), "self_reference", 2, "reject", "missing or null"),
]


@pytest.mark.parametrize("rows, fmt, number, field, snippet", [pytest.param(*c[1:], id=c[0]) for c in BAD_PREF])
@pytest.mark.parametrize("named", [False, True], ids=["auto", "named"])
def test_bad_preference_row(tmp_path, rows, fmt, number, field, snippet, named):
    path = write(tmp_path, rows, "jsonl", name="prefs")
    with pytest.raises(DataError) as err:
        load_preferences(str(path), format=fmt if named else "auto")
    msg = str(err.value)
    assert msg.startswith(f"{path}: row {number}: field '{field}': "), msg
    assert snippet in msg and "--skip_invalid" in msg


BAD_SFT = [
    ("no_assistant", [{"messages": [u("hi")]}, {"messages": [u("hi"), a("hello")]}], 1, "messages", "assistant turn"),
    ("messages_str", [{"messages": [u("hi"), a("ok")]}, {"messages": "hi"}], 2, "messages", "list of messages"),
    ("sharegpt_from", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}], 1,
     "conversations", "message 2: expected 'from'"),
    ("sharegpt_empty", [{"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "yo"}]}], 1,
     "conversations", "message 1: 'content': expected non-empty text"),
    ("completion_int", [{"prompt": "2+2=", "completion": 4}], 1, "completion", "got int (4)"),
    ("text_empty", [{"text": "fine"}, {"text": "fine too"}, {"text": ""}], 3, "text", "non-empty text"),
]


@pytest.mark.parametrize("rows, number, field, snippet", [pytest.param(*c[1:], id=c[0]) for c in BAD_SFT])
def test_bad_sft_row(tmp_path, rows, number, field, snippet):
    path = write(tmp_path, rows, "json", name="sft")
    with pytest.raises(DataError) as err:
        load_sft(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: row {number}: field '{field}': "), msg
    assert snippet in msg


def test_error_message_example(tmp_path):
    rows = EXPLICIT_STR + [dict(EXPLICIT_STR[0], chosen=42)]
    path = write(tmp_path, rows, "jsonl", name="prefs")
    with pytest.raises(DataError) as err:
        load_preferences(path)
    assert str(err.value) == (f"{path}: row 3: field 'chosen': expected a non-empty string or a list of messages, "
                              "got int (42). Fix the row, or pass --skip_invalid to skip invalid rows.")


def test_jsonl_row_number_is_line_number(tmp_path):
    path = tmp_path / "prefs.jsonl"
    lines = [json.dumps(HH[0]), "", json.dumps(HH[1]), json.dumps({"chosen": "x", "rejected": "y"})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"row 4: field 'chosen'"):
        load_preferences(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(HH[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prefs\.jsonl: line 2: invalid JSON"):
        load_preferences(path)
    path.write_text(json.dumps(HH[0]) + '\n{"prompt": "cut off\n', encoding="utf-8")  # json says "starting at"
    with pytest.raises(DataError, match=r"line 2: invalid JSON \(Unterminated string starting at column 12\)"):
        load_preferences(path)


def test_mixed_types_in_json_array(tmp_path):
    # pyarrow cannot hold a column with str and list values; the loader still reports the row precisely
    rows = EXPLICIT_STR + [{"prompt": ["not", "messages"], "chosen": "a", "rejected": "b"}]
    path = write(tmp_path, rows, "json")
    with pytest.raises(DataError, match=r"row 3: field 'prompt': message 1: expected a \{'role'"):
        load_preferences(path)
    with pytest.raises(DataError) as err:
        load_rows(path)
    assert str(err.value) == (f"{path}: row 3: field 'prompt': expected str as in row 1, got list (['not', "
                              "'messages']); a column holds one type in every row. Fix the row.")


@pytest.fixture
def alignkit_log(caplog):
    """The alignkit logger may not propagate to the root logger; attach caplog's handler to it directly."""
    logger = logging.getLogger("alignkit")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="alignkit")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_skip_invalid(tmp_path, alignkit_log):
    rows = [HH[0], {"chosen": 7, "rejected": "x"}, HH[1], dict(HH[0], rejected=HH[0]["chosen"]), HH[0]]
    path = write(tmp_path, rows, "jsonl", name="hh")
    ds = load_preferences(path, skip_invalid=True)
    assert ds.to_list() == [HH_OUT[0], HH_OUT[1], HH_OUT[0]]
    warnings = [r for r in alignkit_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "skipped 2 of 5 rows" in text and f"{path}: row 2: field 'chosen'" in text


def test_skip_invalid_sft_and_no_warning_when_clean(tmp_path, alignkit_log):
    rows = TEXT + [{"text": None}]
    assert load_sft(write(tmp_path, rows, "jsonl"), skip_invalid=True).to_list() == TEXT
    assert "skipped 1 of 3 rows" in alignkit_log.text
    alignkit_log.clear()
    load_sft(TEXT, skip_invalid=True)
    assert not alignkit_log.records



def test_skip_invalid_skips_a_line_of_invalid_json_too(tmp_path, alignkit_log):
    """--skip_invalid stopped at "line 3: invalid JSON" (the reader raised before any row was checked): the line is
    skipped and counted with the rows it skips; without it, the line still stops the run."""
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join([json.dumps(HH[0]), '{"chosen": "x", "rejected": 7}', '{"chosen": "a", oops',
                                json.dumps(HH[1])]) + "\n", encoding="utf-8")
    assert load_preferences(str(path), skip_invalid=True).to_list() == [HH_OUT[0], HH_OUT[1]]
    text = alignkit_log.text
    assert "skipped 2 of 4 rows as invalid (--skip_invalid)" in text and text.count("skipped") == 1, text
    assert f"First problem: {path}: line 3: invalid JSON (" in text  # the lines no JSON, then the rows
    with pytest.raises(DataError, match=rf"^{path}: line 3: invalid JSON"):
        load_preferences(str(path))
    path.write_text('chosen: oops\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"no usable rows: all 1 rows are invalid. First problem: .*line 1: invalid JSON"):
        load_preferences(str(path), skip_invalid=True)
    # A broken FIRST line of a JSON-lines file too (the reader took the file for one broken JSON document); a broken
    # JSON document (most lines no object) still stops, flag or not.
    path.write_text('{"chosen": "a", oops\n' + json.dumps(HH[0]) + "\n" + json.dumps(HH[1]) + "\n", encoding="utf-8")
    assert load_preferences(str(path), skip_invalid=True).to_list() == [HH_OUT[0], HH_OUT[1]]
    path.write_text('[\n  {"chosen": "a", "rejected": "b"},\n  {"chosen": "c", "rejected": "d"}\n,]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 4: invalid JSON \(a trailing comma .* one JSON array of objects"):
        load_preferences(str(path), skip_invalid=True)


def test_rl_and_label_prompts_skip_a_line_of_invalid_json_under_skip_invalid(tmp_path, alignkit_log):
    """rl.py's and label.py's prompts (and responses) files: --skip_invalid skips a line that is no JSON, counted
    in the one line of rows skipped."""
    from alignkit.feedback.labeling import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": oops\n{"prompt": "two"}\n', encoding="utf-8")
    prompts = read_prompts(str(path), skip_invalid=True)
    assert [p.messages[0]["content"] for p in prompts] == ["one", "two"]
    assert f"skipped 1 of 3 rows as invalid (--skip_invalid). First problem: {path}: line 2: invalid JSON" in \
        alignkit_log.text
    with pytest.raises(DataError, match=rf"^{path}: line 2: invalid JSON"):
        read_prompts(str(path))


def test_skip_invalid_under_max_prompts_counts_only_the_lines_read(tmp_path, alignkit_log):
    """rl.py's and label.py's prompts with --max_prompts: the invalid JSON lines of the whole file were counted, so
    the line of rows skipped named a line past the limit, which the run never read ("skipped 2 of 4 rows" for 3
    lines read; "skipped 1 of 2 rows" for a first prompt read alone)."""
    from alignkit.feedback.labeling import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one"}\n{"prompt": oops\n{"prompt": "two"}\n{"prompt": "three"}\n{"prompt": bad\n',
                    encoding="utf-8")
    prompts = read_prompts(str(path), max_prompts=2, skip_invalid=True)
    assert [p.messages[0]["content"] for p in prompts] == ["one", "two"]
    said = [r.getMessage() for r in alignkit_log.records if "(--skip_invalid)" in r.getMessage()]
    assert said == [f"{path}: skipped 1 of 3 rows as invalid (--skip_invalid). First problem: {path}: line 2: "
                    "invalid JSON (Expecting value at column 12)."]
    alignkit_log.clear()
    assert [p.messages[0]["content"] for p in read_prompts(str(path), max_prompts=1, skip_invalid=True)] == ["one"]
    assert "(--skip_invalid)" not in alignkit_log.text  # its only line read is valid
    read_prompts(str(path), skip_invalid=True)  # the whole file read: both of its invalid lines
    assert f"skipped 2 of 5 rows as invalid (--skip_invalid). First problem: {path}: line 2" in alignkit_log.text


def test_sft_conversations_ending_without_an_answer_are_said_once_by_file_and_row(tmp_path, alignkit_log):
    """[assistant, user] or [user, assistant, user] trained without a word (TRL takes them; dpo.py refuses such a
    chosen): one line per dataset, naming how many, the first by file and row (rows --skip_invalid skipped counted
    in its place), what the trailing turns do and the fix."""
    ok = {"messages": [u("hi"), a("hello")]}
    rows = [ok, ok, {"messages": [u("no answer")]}, ok, {"messages": [a("hello"), u("bye")]}, ok,
            {"messages": [u("hi"), a("hello"), u("and?")]}, ok]
    path = write(tmp_path, rows, "jsonl", name="chats")
    assert len(load_sft(path, skip_invalid=True)) == 7  # kept, as TRL keeps them
    said = [r.getMessage() for r in alignkit_log.records if "not the assistant's" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"{path}: 2 of 7 conversations end with a turn that is not the assistant's (the first: "
                              f"{path}: row 5, a user turn last)")
    assert "teach nothing under --train_on auto's assistant-only loss" in said[0]
    assert "End each conversation with the assistant's answer, or drop the trailing turns" in said[0]
    alignkit_log.clear()
    load_sft(write(tmp_path, [ok, {"messages": [s("be brief"), u("hi"), a("hello")]}], "jsonl", name="well"))
    assert not alignkit_log.records

def test_all_rows_invalid(tmp_path):
    path = write(tmp_path, [{"chosen": "a", "rejected": "b"}, {"chosen": "c", "rejected": "d"}], "csv")
    with pytest.raises(DataError, match="no usable rows: all 2 rows are invalid") as err:
        load_preferences(path, skip_invalid=True)
    assert str(path) in str(err.value) and "row 2" in str(err.value)  # a CSV's first row is on line 2


@pytest.mark.parametrize("content", ["", "\n", "[]", "id,prompt,chosen,rejected\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / ("prefs.csv" if "," in content else "prefs.jsonl")
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no usable rows") as err:
        load_preferences(path)
    assert str(path) in str(err.value)


def test_empty_parquet(tmp_path):
    path = tmp_path / "sft.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(DataError, match=f"{path}: no usable rows"):
        load_sft(path)


def test_unknown_columns(tmp_path):
    path = write(tmp_path, [{"question_text": "q", "good": "a", "bad": "b"}], "jsonl")
    with pytest.raises(DataError) as err:
        load_preferences(path)
    msg = str(err.value)
    assert str(path) in msg and "question_text, good, bad" in msg and "--dataset_format" in msg
    assert all(name in msg for name in D.PREFERENCE_FORMATS)
    with pytest.raises(DataError) as err:
        load_sft(path)
    assert all(name in str(err.value) for name in D.SFT_FORMATS)


def test_named_format_missing_column(tmp_path):
    path = write(tmp_path, SHP, "jsonl")
    with pytest.raises(DataError, match=r"format 'explicit' needs column 'prompt', which is missing") as err:
        load_preferences(path, format="explicit")
    assert str(path) in str(err.value)
    no_labels = [{k: v for k, v in row.items() if k != "labels"} for row in SHP]
    with pytest.raises(DataError, match="format 'shp' needs column 'labels'"):
        load_preferences(no_labels, format="shp")
    with pytest.raises(DataError, match="needs column 'conversations'"):
        load_sft(TEXT, format="sharegpt")
    with pytest.raises(DataError, match="unknown preference data format 'dpo'"):
        load_preferences(HH, format="dpo")


def test_named_hh_on_message_lists_is_a_row_error():
    with pytest.raises(DataError, match=r"row 1: field 'chosen': expected a transcript"):
        load_preferences(UF, format="hh")


# ------------------------------------------------------------------------------ HH already split
def _markers(ds):
    return [m["content"] for row in ds.to_list() for field in ("prompt", "chosen", "rejected") for m in row[field]
            if "Human:" in m["content"] or "Assistant:" in m["content"]]


@pytest.mark.parametrize("fmt", ["auto", "hh", "explicit"])
def test_split_hh_is_parsed_into_turns(tmp_path, fmt):
    """Split HH (a real multi-turn row, with the leading spaces the reference code leaves on the answers) becomes
    user/assistant turns under every format name that accepts it, with no marker left inside a message; answers
    given as whole transcripts that continue the prompt work too."""
    path = write(tmp_path, HH_SPLIT, "jsonl")
    ds = load_preferences(str(path), format=fmt)
    assert ds.to_list() == HH_OUT and not _markers(ds)
    assert [m["role"] for m in ds[1]["prompt"]] == ["user", "assistant", "user"]
    whole = [dict(row, chosen=full["chosen"], rejected=full["rejected"]) for row, full in zip(HH_SPLIT, HH)]
    assert load_preferences(whole, format=fmt).to_list() == HH_OUT
    no_newlines = [dict(row, prompt=row["prompt"].lstrip()) for row in HH_SPLIT]  # "Human: ..." at the very start
    assert load_preferences(no_newlines, format=fmt).to_list() == HH_OUT


def test_prompts_that_merely_mention_human_are_not_hh():
    rows = [
        {"prompt": "Summarise this chat log:\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye",
         "chosen": "A greeting and a goodbye.", "rejected": "Nothing."},
        {"prompt": "Human: is a word I use for people. What does Assistant: mean in a transcript?",
         "chosen": "It marks the assistant's turn.", "rejected": "A job title."},
        {"prompt": "Write a dialogue that ends with the line\n\nAssistant:", "chosen": "Sure: ...", "rejected": "No."},
    ]
    out = load_preferences(rows).to_list()
    assert [r["prompt"] for r in out] == [r["prompt"] for r in rows]  # left whole, as TRL's standard text
    assert not D.is_hh_prompt(rows[0]["prompt"]) and D.is_hh_prompt("Human: hi\n\nAssistant:")


def _split_like_reference(row):
    """Cut an HH transcript pair as the DPO reference code does (preference_datasets.py,
    extract_anthropic_prompt): the prompt runs through the last "\n\nAssistant:", the answers are the rest."""
    cut = row["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
    prompt = row["chosen"][:cut]
    return {"prompt": prompt, "chosen": row["chosen"][len(prompt):], "rejected": row["rejected"][len(prompt):]}


def test_split_hh_answer_that_begins_with_human_is_kept(tmp_path):
    """A quirk of the real data: some answers' own text begins with "Human:" (no "\n\n" before it, so it is no
    transcript marker). The reference code keeps such rows as they are; so must we, and --skip_invalid must not
    drop them."""
    full = {"chosen": "\n\nHuman: Can you help me?\n\nAssistant: Human: Sure, what do you need?",
            "rejected": "\n\nHuman: Can you help me?\n\nAssistant: No."}
    row = _split_like_reference(full)
    assert row["chosen"] == " Human: Sure, what do you need?"
    want = {"prompt": [u("Can you help me?")], "chosen": [a("Human: Sure, what do you need?")],
            "rejected": [a("No.")]}
    path = write(tmp_path, HH_SPLIT + [row], "jsonl")
    for fmt in ("auto", "hh", "explicit"):
        assert load_preferences(str(path), format=fmt).to_list() == HH_OUT + [want]
        assert len(load_preferences(str(path), format=fmt, skip_invalid=True)) == 3
    assert load_preferences([full]).to_list() == [want]  # the unsplit transcript agrees
    whole = dict(row, chosen=full["chosen"])  # a whole transcript as the answer still parses as one
    assert load_preferences([whole], format="hh").to_list() == [want]


@pytest.mark.parametrize("row, field, message", [
    (dict(HH_SPLIT[0], prompt="What are some cuss words in english?"), "prompt", "an HH prompt"),
    (dict(HH_SPLIT[1], chosen=" About an hour.\n\nHuman: Thanks!\n\nAssistant: You're welcome."), "chosen",
     "the answer alone"),
    (dict(HH_SPLIT[1], rejected=HH[0]["rejected"]), "rejected", "starts with the prompt's turns"),
    (dict(HH_SPLIT[0], prompt="\n\nHuman: \n\nAssistant:"), "prompt", "turn 1 (Human): expected non-empty text"),
    (dict(HH_SPLIT[0], rejected="   "), "rejected", "non-empty text"),
])
def test_split_hh_row_errors_name_the_row_and_field(row, field, message):
    with pytest.raises(DataError, match=rf"row 2: field '{field}': .*{re.escape(message)}"):
        load_preferences([HH_SPLIT[1], row], format="hh")


def test_trl_s_standard_implicit_prompt_rows_are_split_as_trl_splits_them(tmp_path):
    """TRL's "preference, standard, implicit prompt" example was refused as a broken HH transcript."""
    rows = [{"chosen": "The sky is blue.", "rejected": "The sky is green."},
            {"chosen": "Snow is white.", "rejected": "Snow is black."}]
    data = load_preferences(str(write(tmp_path, rows, "jsonl")))
    assert data[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}  # texts, as TRL keeps them
    assert data[1]["prompt"] == "Snow is"
    apart = write(tmp_path, [{"chosen": "Blue.", "rejected": "Green."}], "jsonl", name="apart")
    with pytest.raises(DataError, match=r"row 1: field 'rejected': expected the same prompt at the start"):
        load_preferences(str(apart))


def test_texts_among_conversations_are_read_as_conversations_in_a_dataset_and_a_mixture(tmp_path, caplog):
    """TRL reads a dataset as conversational or standard from its first row, and Arrow keeps one type per column:
    texts beside message lists (in one dataset, or in a dataset_mixture) are read as one user and one assistant
    turn, as before standard rows stayed text; a dataset of texts only stays text."""
    from types import SimpleNamespace

    from alignkit.core.mixture import load_train_eval

    text = {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}
    chat = {"prompt": [u("3 + 3?")], "chosen": [a("6")], "rejected": [a("7")]}
    mixed = write(tmp_path, [text, chat], "jsonl", name="mixed")
    with caplog.at_level("INFO", logger="alignkit"):
        rows = load_preferences(str(mixed)).to_list()
    assert rows == [{"prompt": [u("Q: 2 + 2?\nA:")], "chosen": [a(" 4")], "rejected": [a(" 5")]}, chat]
    assert "1 of 2 rows are texts among conversations" in caplog.text
    sft = load_sft([{"prompt": [u("hi")], "completion": [a("hello")]}, {"prompt": "hey", "completion": " yo"}])
    assert sft[1] == {"prompt": [u("hey")], "completion": [a(" yo")]}
    texts, chats = (write(tmp_path, [row] * 4, "jsonl", name=name) for row, name in ((text, "texts"), (chat, "chats")))
    assert load_preferences(str(texts))[0] == text
    s = SimpleNamespace(dataset_mixture={"datasets": [{"id": str(texts)}, {"id": str(chats)}]}, dataset_format="auto",
                        skip_invalid=False, max_samples=None, eval_split=0.0, seed=0)
    train, _ = load_train_eval("preference", s)
    assert sorted(row["prompt"][0]["content"] for row in train) == ["3 + 3?"] * 4 + ["Q: 2 + 2?\nA:"] * 4
    # A dataset whose share rounds to no rows says nothing about the kind: the texts stay texts.
    s.dataset_mixture = {"datasets": [{"id": str(texts), "fraction": 1.0}, {"id": str(chats), "fraction": 0.001}]}
    assert load_train_eval("preference", s)[0][0] == text
    # A held-out split read apart from the training split is read alike (it was a template on one, text on the other).
    folder = tmp_path / "splits"
    folder.mkdir()
    write(folder, [text] * 4, "jsonl", name="train")
    write(folder, [text, chat], "jsonl", name="test")
    s = SimpleNamespace(dataset_mixture=None, dataset_id=str(folder), dataset_format="auto", dataset_split="train",
                        dataset_test_split="test", dataset_config=None, skip_invalid=False, max_samples=None, seed=0)
    train, held_out = load_train_eval("preference", s)
    assert isinstance(train[0]["prompt"], list) and isinstance(held_out[0]["prompt"], list)
    # An SFT text dataset beside a messages one: refused, not rows with both columns.
    lines = write(tmp_path, [{"text": "some text"}] * 2, "jsonl", name="lines")
    chats_sft = write(tmp_path, [{"messages": [u("hi"), a("yo")]}] * 2, "jsonl", name="chats_sft")
    s = SimpleNamespace(dataset_mixture={"datasets": [{"id": str(lines)}, {"id": str(chats_sft)}]},
                        dataset_format="auto", skip_invalid=False, max_samples=None, eval_split=0.0, seed=0)
    with pytest.raises(DataError, match=rf"their rows have different columns \({lines}: text; {chats_sft}: messages\)"):
        load_train_eval("sft", s)
    # Messages beside prompt/completion rows: each dataset named with its columns, and the way to write them alike
    # (the error guessed "an SFT text dataset beside a messages one?" and named neither: an sft.py audit).
    pairs_sft = write(tmp_path, [{"prompt": "hey", "completion": " yo"}] * 2, "jsonl", name="pairs_sft")
    s.dataset_mixture = {"datasets": [{"id": str(chats_sft)}, {"id": str(pairs_sft), "test": True}]}
    with pytest.raises(DataError, match=rf"\({chats_sft}: messages; {pairs_sft} \(test\): completion, prompt\); TRL "
                                        r"trains one format per dataset: write them in one \(prompt/completion rows as "
                                        r"messages: the prompt's turns, then the completion's\)"):
        load_train_eval("sft", s)


def test_a_handbook_row_with_a_system_turn_and_a_prompt_string_is_read(tmp_path):
    """UltraFeedback's shape with a system turn: the prompt column leaves it out, the conversations open with it."""
    row = {"prompt": "What color is the sky?", "chosen": [s("Be brief."), u("What color is the sky?"), a("Blue.")],
           "rejected": [s("Be brief."), u("What color is the sky?"), a("Green.")]}
    (data,) = load_preferences(str(write(tmp_path, [row], "jsonl"))).to_list()
    assert data["prompt"] == [s("Be brief."), u("What color is the sky?")] and data["chosen"] == [a("Blue.")]


@pytest.mark.parametrize("label, desirable", [(1, True), (0, False), ("1", True), ("0", False), (True, True),
                                             (1.0, True), (0.0, False), ("0.0", False)])
def test_kto_labels_as_trl_casts_them(label, desirable):
    """TRL's KTOTrainer casts the label to bool: 1 and 0 (ints, or a CSV's strings) were refused, and so were 1.0
    and 0.0, as a CSV or parquet export with a missing label elsewhere stores them."""
    from alignkit.core.data import load_unpaired

    (row,) = load_unpaired([{"prompt": "q", "completion": "c", "label": label}]).to_list()
    assert row["label"] is desirable
    with pytest.raises(DataError, match=r"field 'label': expected true or false \(a boolean; 1 or 0, .* in any case\), got int \(2\)"):
        load_unpaired([{"prompt": "q", "completion": "c", "label": 2}])


def test_tool_calls_and_reasoning_are_kept_as_written_and_no_other_message_gets_them(tmp_path):
    """TRL hands whole messages to the chat template: a tool call's `tool_calls`, a tool turn's `name` and
    `reasoning_content` were dropped (training on the text around them only). Kept now, and stored as JSON: as
    Arrow structs every other message got them as None, which a template testing `'tool_calls' in message`
    renders. A call with no text beside it (content null, OpenAI's form) is a message too. In a mixture beside a
    dataset without them, both concatenate."""
    from types import SimpleNamespace

    from alignkit.core.mixture import load_train_eval

    call = [{"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]
    tools = [{"messages": [u("Weather?"), {"role": "assistant", "content": None, "tool_calls": call},
                           {"role": "tool", "name": "weather", "content": "sunny"}, a("Sunny.")]},
             {"messages": [u("2+2?"), {"role": "assistant", "content": "4", "reasoning_content": "two and two"}]}]
    data = load_sft(str(write(tmp_path, tools, "jsonl", name="tools")))
    assert data.to_list() == [{"messages": [u("Weather?"), {"role": "assistant", "content": "", "tool_calls": call},
                                            {"role": "tool", "content": "sunny", "name": "weather"}, a("Sunny.")]},
                              {"messages": [u("2+2?"), {**a("4"), "reasoning_content": "two and two"}]}]
    plain = write(tmp_path, [{"messages": [u("hi"), a("hello")]}] * 2, "jsonl", name="plain")
    assert load_sft(str(plain)).to_list() == [{"messages": [u("hi"), a("hello")]}] * 2
    s = SimpleNamespace(dataset_mixture={"datasets": [{"id": str(plain)}, {"id": str(tmp_path / "tools.jsonl")}]},
                        dataset_format="auto", skip_invalid=False, max_samples=None, eval_split=0.0, seed=0)
    train, _ = load_train_eval("sft", s)
    assert sorted(train.to_list(), key=str) == sorted([*data.to_list(), *load_sft(str(plain)).to_list()], key=str)
    with pytest.raises(DataError, match=r"message 2: 'content': expected non-empty text, got nothing"):
        load_sft([{"messages": [u("hi"), {"role": "assistant", "content": None}]}])
    # A tool that returned nothing, and a turn of reasoning alone, are turns too (they were refused as empty).
    quiet = [u("Log it."), {"role": "assistant", "content": "", "tool_calls": call},
             {"role": "tool", "content": None, "tool_call_id": "1"}, {"role": "assistant", "content": "",
                                                                      "reasoning_content": "nothing came back"}]
    assert load_sft([{"messages": quiet}])[0]["messages"][2:] == [
        {"role": "tool", "content": "", "tool_call_id": "1"}, {"role": "assistant", "content": "",
                                                               "reasoning_content": "nothing came back"}]
    # Answers or contexts that differ only in a tool call differ (they were refused as identical, or taken as one).
    other = [{"type": "function", "function": {"name": "stocks", "arguments": {}}}]
    calls = [{"role": "assistant", "content": "", "tool_calls": c} for c in (call, other)]
    pair = load_preferences([{"prompt": [u("Weather?")], "chosen": calls[:1], "rejected": calls[1:]}]).to_list()
    assert pair == [{"prompt": [u("Weather?")], "chosen": calls[:1], "rejected": calls[1:]}]
    # Tool-calling trajectories as the answers (TRL's completions: every turn after the prompt). Two whole
    # conversations that part at the call are split where they part, as trl.extract_prompt splits them (they
    # were refused: only the last assistant turn could be an answer).
    sun = {"role": "tool", "content": "sun"}
    trajectories = [calls[0], sun, a("Sunny.")], [calls[1], sun, a("Up.")]
    implicit = load_preferences([{"chosen": [u("Weather?"), *trajectories[0]],
                                  "rejected": [u("Weather?"), *trajectories[1]]}]).to_list()
    assert implicit == [{"prompt": [u("Weather?")], "chosen": trajectories[0], "rejected": trajectories[1]}]
    explicit = load_preferences([{"prompt": [u("Weather?")], "chosen": trajectories[0],
                                  "rejected": trajectories[1]}]).to_list()
    assert explicit == implicit
    assert load_preferences([{"prompt": "Weather?", "chosen": trajectories[0], "rejected": "Sunny."}]).to_list() == [
        {"prompt": [u("Weather?")], "chosen": trajectories[0], "rejected": [a("Sunny.")]}]
    # The same call, other tool results: the prompt is cut back to end at the user turn, never at the call.
    other_result = load_preferences([{"chosen": [u("Weather?"), calls[0], sun, a("Sunny.")],
                                      "rejected": [u("Weather?"), calls[0], {"role": "tool", "content": "rain"},
                                                   a("Rainy.")]}]).to_list()[0]
    assert other_result["prompt"] == [u("Weather?")] and len(other_result["chosen"]) == 3
    # The same trajectory up to the final answer: the answers are those (unchanged).
    same_call = load_preferences([{"chosen": [u("Weather?"), calls[0], sun, a("Sunny.")],
                                   "rejected": [u("Weather?"), calls[0], sun, a("Up.")]}]).to_list()[0]
    assert same_call == {"prompt": [u("Weather?"), calls[0], sun], "chosen": [a("Sunny.")], "rejected": [a("Up.")]}
    # Answers may not differ in what the user said; an answer opens with the assistant; two equal ones are refused.
    with pytest.raises(DataError, match=r"field 'rejected': expected the same turns before the final answer as "
                                        r"'chosen', got different ones \(answers may differ in assistant and tool"):
        load_preferences([{"chosen": [u("Weather?"), a("Sun."), u("And tomorrow?"), a("Rain.")],
                           "rejected": [u("Weather?"), a("Hm."), u("Tomorrow?"), a("Snow.")]}])
    with pytest.raises(DataError, match=r"field 'chosen': expected an answer that opens with an assistant turn"):
        load_preferences([{"prompt": "Weather?", "chosen": [sun, a("Sunny.")], "rejected": "Up."}])
    with pytest.raises(DataError, match=r"field 'rejected': expected an answer different from 'chosen'"):
        load_preferences([{"prompt": "Weather?", "chosen": trajectories[0], "rejected": trajectories[0]}])
    # SFT's and KTO's completions too.
    assert load_sft([{"prompt": "Weather?", "completion": trajectories[0]}]).to_list() == [
        {"prompt": [u("Weather?")], "completion": trajectories[0]}]
    # Tool schemas differ from row to row: each kept as written, no other row's keys as None.
    schemas = [[{"type": "function", "function": {"name": "f", "parameters": {"city": "str"}}}],
               [{"type": "function", "function": {"name": "g", "parameters": {"n": "int"}}}]]
    with_tools = load_sft([{"messages": [u("hi"), a("yo")], "tools": t} for t in schemas])
    assert with_tools["tools"] == schemas


def test_template_columns_keep_each_row_s_arguments_and_read_tools_as_trl_does(tmp_path):
    """A row's chat_template_kwargs of {} beside {"enable_thinking": false} in another became
    {"enable_thinking": None} (Arrow's one set of keys), which `enable_thinking is defined` takes as given. A
    `tools` column written as JSON text (TRL's trainers decode it) reached the template check as a string; text that
    is not a list of schemas got as far as the trainer."""
    both = load_sft([{"messages": [u("hi"), a("yo")], "chat_template_kwargs": k}
                     for k in ({}, {"enable_thinking": False}, None)])
    assert both["chat_template_kwargs"] == [{}, {"enable_thinking": False}, {}]
    same = load_sft([{"messages": [u("hi"), a("yo")], "chat_template_kwargs": {"enable_thinking": b}} for b in (1, 0)])
    assert same["chat_template_kwargs"] == [{"enable_thinking": 1}, {"enable_thinking": 0}]
    schema = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    rows = [{"messages": [u("hi"), a("yo")], "tools": t} for t in (json.dumps(schema), "", [], None)]
    assert load_sft(rows)["tools"] == [schema, None, None, None]
    path = write(tmp_path, [{"messages": [u("hi"), a("yo")], "tools": "f(city)"}], "jsonl", name="bad-tools")
    with pytest.raises(DataError, match=r"bad-tools.jsonl: row 1: field 'tools': expected a list of tool schemas, or "
                                        r"that list as JSON text, got str \('f\(city\)'\)\. Fix the row"):
        load_sft(str(path))


def test_sharegpt_tool_turns_and_system_as_llama_factory_writes_them(tmp_path):
    """LLaMA-Factory's ShareGPT rows (function_call / observation turns, a `system` column, `tools` as JSON text)
    were refused ("'from' to be one of human, ..."). A call becomes an assistant turn with tool_calls in the chat
    templates' form, an observation the tool's turn, the system text the first turn."""
    rows = [{"conversations": [
        {"from": "human", "value": "Weather in Oslo?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Oslo"}})},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."}],
        "system": "Use the tools.", "tools": json.dumps([{"type": "function", "function": {"name": "weather"}}])}]
    data = load_sft(str(write(tmp_path, rows, "jsonl", name="lf")))
    assert data[0]["messages"] == [
        {"role": "system", "content": "Use the tools."}, u("Weather in Oslo?"),
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "sunny"}, a("Sunny.")]
    assert data[0]["tools"] == [{"type": "function", "function": {"name": "weather"}}]
    # arguments as JSON text too, and several calls in one turn
    two = json.dumps([{"name": "f", "arguments": '{"n": 1}'}, {"name": "g", "arguments": {}}])
    calls = load_sft([{"conversations": [{"from": "human", "value": "Go."}, {"from": "function_call", "value": two},
                                         {"from": "observation", "value": "ok"}, {"from": "gpt", "value": "Done."}]}])
    assert [c["function"] for c in calls[0]["messages"][1]["tool_calls"]] == [
        {"name": "f", "arguments": {"n": 1}}, {"name": "g", "arguments": {}}]
    # A system turn of its own wins over the column (LLaMA-Factory's way): one system turn, never two.
    both = load_sft([{"system": "S1", "conversations": [{"from": "system", "value": "S2"}, {"from": "human",
                                                                                          "value": "Go."},
                                                        {"from": "gpt", "value": "Done."}]}])
    assert both[0]["messages"] == [{"role": "system", "content": "S2"}, u("Go."), a("Done.")]
    with pytest.raises(DataError, match="expected the call as JSON"):  # templates read arguments as a mapping
        load_sft([{"conversations": [{"from": "human", "value": "Go."}, {"from": "function_call", "value": json.dumps(
            {"name": "f", "arguments": "[1, 2]"})}, {"from": "observation", "value": "ok"}, {"from": "gpt",
                                                                                        "value": "Done."}]}])
    bad = write(tmp_path, [{"conversations": [{"from": "human", "value": "Go."},
                                              {"from": "function_call", "value": "weather(Oslo)"}]}], "jsonl", name="bad")
    with pytest.raises(DataError, match=r"bad.jsonl: row 1: field 'conversations': message 2: 'value': expected the "
                                        r"call as JSON"):
        load_sft(str(bad))


def test_a_mixture_keeps_each_row_s_template_arguments(tmp_path):
    """Parts of a dataset_mixture with and without chat_template_kwargs, or with other keys: Arrow gave {} the other
    part's keys as None ({"enable_thinking": None}), and a part without the column gave None, which TRL unpacks
    (a TypeError after the model loaded). Every row keeps its own; a part without them gets {}."""
    from types import SimpleNamespace

    from alignkit.core.mixture import load_train_eval

    chat = {"messages": [u("hi"), a("yo")]}
    parts = {"think": [{**chat, "chat_template_kwargs": {"enable_thinking": False}}] * 2,
             "empty": [{**chat, "chat_template_kwargs": {}}] * 2, "none": [chat] * 2}
    for name, rows in parts.items():
        write(tmp_path, rows, "jsonl", name=name)
    s = SimpleNamespace(dataset_mixture={"datasets": [{"id": str(tmp_path / f"{n}.jsonl")} for n in parts]},
                        dataset_format="auto", skip_invalid=False, max_samples=None, eval_split=0.0, seed=0)
    train, _ = load_train_eval("sft", s)
    assert sorted(map(str, train["chat_template_kwargs"])) == sorted(["{'enable_thinking': False}"] * 2 + ["{}"] * 4)


def test_a_dataset_beside_a_mixture_is_named_as_unused_and_a_file_takes_no_configuration(tmp_path, alignkit_log):
    """TRL audit: --dataset_name beside a recipe's dataset_mixture was silently unused (TRL's scripts warn), and
    --dataset_config on a single file was accepted with no effect (load_dataset refuses it)."""
    from alignkit.core.args import ConfigError
    from alignkit.core.config import DPOSettings
    from alignkit.core.mixture import load_train_eval

    pairs = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4, "jsonl", name="pairs")
    mine = write(tmp_path, [{"prompt": "q2", "chosen": "c", "rejected": "d"}] * 4, "jsonl", name="mine")
    from alignkit.core.args import parse_config

    mixture = json.dumps({"datasets": [{"id": str(pairs)}]})
    s = parse_config(DPOSettings, env_file=None, args=["--dataset_id", str(mine), "--dataset_mixture", mixture,
                                                       "--eval_split", "0"])
    train, _ = load_train_eval("preference", s)
    assert train[0]["prompt"] == "q"
    assert f"dataset_id {mine} (on the command line) is not used: the dataset_mixture is, and names each " \
           "dataset's split, configuration and held-out rows. To train on that dataset, pass --dataset_mixture " \
           "none" in alignkit_log.text
    alignkit_log.clear()  # a mixture alone (a preset's or the default dataset_id beside it) says nothing
    parse_config(DPOSettings, env_file=None, args=["--dataset_mixture", mixture])
    assert "is not used" not in alignkit_log.text
    with pytest.raises(ConfigError, match=rf"^--dataset_config en: {re.escape(str(mine))} is a single file, which has "
                                          r"no configurations\. Drop --dataset_config"):
        load_train_eval("preference", DPOSettings(dataset_id=str(mine), dataset_config="en", eval_split=0.0))


def test_max_samples_caps_a_held_out_split_of_its_own_too(tmp_path, alignkit_log):
    """--max_samples ("for quick runs") capped the training rows only: a --dataset_test_split, or a mixture's test
    entries, were evaluated in full (every row of UltraFeedback's 2,000-row test_prefs at each evaluation)."""
    from alignkit.core.config import DPOSettings
    from alignkit.core.mixture import load_train_eval

    alignkit_log.set_level(logging.INFO, logger="alignkit")
    folder = tmp_path / "pairs"
    folder.mkdir()
    write(folder, [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(10)], "jsonl", name="train")
    write(folder, [{"prompt": f"t{i}", "chosen": "a", "rejected": "b"} for i in range(8)], "jsonl", name="test")
    s = DPOSettings(dataset_id=str(folder), dataset_test_split="test", max_samples=3, report_to="none")
    train, held_out = load_train_eval("preference", s)
    assert (len(train), len(held_out)) == (3, 3) and set(held_out["prompt"]) < {f"t{i}" for i in range(8)}
    assert "--max_samples 3: evaluating on 3 of the 8 held-out rows (split test)" in alignkit_log.text
    again = load_train_eval("preference", s)[1]  # seeded: the same rows each time (a resumed run's)
    assert again["prompt"] == held_out["prompt"]
    from alignkit.core.mixture import HELD_OUT  # where they come from, for the run's record and card

    assert getattr(held_out, HELD_OUT) == {"split": "test", "of_rows": 8}  # 3 of its 8 rows: the card says so
    auto = DPOSettings(dataset_id=str(folder), dataset_test_split="auto", report_to="none")
    assert getattr(load_train_eval("preference", auto)[1], HELD_OUT) == {"split": "test"}
    mixture = {"datasets": [{"id": str(folder / "train.jsonl")}, {"id": str(folder / "test.jsonl"), "test": True}]}
    train, held_out = load_train_eval("preference", DPOSettings(dataset_mixture=mixture, max_samples=4,
                                                                report_to="none"))
    assert (len(train), len(held_out)) == (4, 4) and getattr(held_out, HELD_OUT) == {"mixture": "test rows", "of_rows": 8}
    s = DPOSettings(dataset_id=str(folder), dataset_test_split="test", max_samples=20, report_to="none")
    assert [len(d) for d in load_train_eval("preference", s)] == [10, 8]  # fewer rows than the cap: all of them


def test_a_split_beside_a_mixture_is_refused_not_ignored(tmp_path, monkeypatch, alignkit_log):
    """--dataset_test_split NAME, --dataset_split NAME or --dataset_config NAME beside a dataset_mixture were unused
    without a word: the mixture's own test entries (or an --eval_split share) were evaluated on. TRL's scripts read
    the mixture's "train" and "test" rows, so those two names keep their meaning. A recipe's single-dataset
    settings under a --dataset_mixture on the command line go with its dataset_id, named as unused (the review of
    session 33: the project's own recipes were refused beside a --dataset_mixture)."""
    from alignkit.core.args import ConfigError, parse_config
    from alignkit.core.config import DPOSettings, SFTSettings

    pairs = write(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 4, "jsonl", name="pairs")
    mixture = json.dumps({"datasets": [{"id": str(pairs)}], "test_split_size": 1})
    with pytest.raises(ConfigError, match=r"^--dataset_test_split test_prefs beside a dataset_mixture: the mixture "
                                          r"names its own held-out rows.*split: test_prefs and test: true \(with the "
                                          r"handbook's dataset_mixer: list it in dataset_splits beside the train split"):
        parse_config(DPOSettings, env_file=None, args=["--dataset_mixture", mixture,
                                                       "--dataset_test_split", "test_prefs"])
    with pytest.raises(ConfigError, match=r"^--dataset_train_split train_prefs beside a dataset_mixture: .*remove "
                                          r"this setting \(dataset_split is TRL's dataset_train_split\)"):
        parse_config(DPOSettings, env_file=None, args=["--dataset_mixture", mixture, "--dataset_train_split",
                                                       "train_prefs"])
    with pytest.raises(ConfigError, match=r"^--dataset_config en beside a dataset_mixture: .*config: on an entry; "
                                          r"with the handbook's dataset_mixer, dataset_configs\)"):
        parse_config(DPOSettings, env_file=None, args=["--dataset_mixture", mixture, "--dataset_config", "en"])
    for split in ("test", "auto"):  # the mixture's test rows, as TRL's scripts read them
        s = parse_config(DPOSettings, env_file=None, args=["--dataset_mixture", mixture, "--dataset_test_split", split,
                                                           "--dataset_split", "train"])
        assert s.dataset_test_split == split
    # The project's own recipes, their dataset under a mixture given on the command line: named, not refused.
    monkeypatch.chdir(ROOT)
    s = parse_config(DPOSettings, env_file=None, args=["--config", "recipes/zephyr-dpo.yaml", "--dataset_mixture",
                                                       mixture])
    assert (s.dataset_split, s.dataset_test_split, s.dataset_mixture["test_split_size"]) == ("train", None, 1)
    said = [r.getMessage() for r in alignkit_log.records if "not used: the dataset_mixture is" in r.getMessage()]
    assert said and ("dataset_id HuggingFaceH4/ultrafeedback_binarized (in the recipe), dataset_split train_prefs "
                     "(in the recipe), dataset_test_split test_prefs (in the recipe) are not used") in said[0]
    s = parse_config(SFTSettings, env_file=None, args=["--config", "recipes/mistral-7b-qlora-sft.yaml",
                                                       "--dataset_mixture", mixture])
    assert s.dataset_split == "train" and s.dataset_mixture
    alignkit_log.clear()  # a recipe's split named test, or a configuration named auto: named too (the review)
    recipe = tmp_path / "single.yaml"
    recipe.write_text("dataset_id: foo/bar\ndataset_split: test\ndataset_config: auto\n")
    parse_config(DPOSettings, env_file=None, args=["--config", str(recipe), "--dataset_mixture", mixture])
    assert "dataset_split test (in the recipe), dataset_config auto (in the recipe) are not used" in alignkit_log.text
    alignkit_log.clear()  # an eval_split beside a mixture that holds test rows out: named, no dataset to go back to
    recipe.write_text("eval_split: 0.2\n")
    parse_config(DPOSettings, env_file=None, args=["--config", str(recipe), "--dataset_mixture", mixture])
    assert "eval_split 0.2 (in the recipe) is not used: the dataset_mixture is, and names each dataset's split, " \
           "configuration and held-out rows\n" in alignkit_log.text + "\n"
    # reward.py, rl.py and rlaif.py read one split: the mixture itself is refused first, nothing named as unused.
    from alignkit.core.config import RLSettings

    alignkit_log.clear()
    recipe.write_text("dataset_config: en\n")
    for args in (["--dataset_mixture", mixture, "--dataset_split", "foo"],
                 ["--config", str(recipe), "--dataset_mixture", mixture]):
        with pytest.raises(ConfigError, match="drop dataset_mixture"):
            parse_config(RLSettings, env_file=None, args=args)
    assert "not used" not in alignkit_log.text
    # The eval_steps check no longer counts a test split the mixture does not read as held-out data, and says what does.
    with pytest.raises(ConfigError, match="eval_steps 5 but no held-out data.*or an entry with test: true"):
        parse_config(DPOSettings, env_file=None, args=["--dataset_mixture", json.dumps({"datasets": [{"id": str(pairs)}]}),
                                                       "--dataset_test_split", "test", "--eval_split", "0",
                                                       "--eval_steps", "5"])


def test_preference_pairs_are_held_out_by_whole_prompts_for_dpo_and_reward(tmp_path):
    """label.py --num_samples 4 writes several pairs per prompt; held out row by row, a prompt's other pairs trained,
    so DPO's and the reward model's held-out accuracy measured prompts the model had learned. With one pair per
    prompt the split is the plain one it always was (a run's rows, and so `--resume auto`, are unchanged)."""
    from alignkit.core.mixture import load_train_eval, split
    from alignkit.core.train_settings import DPOSettings

    many = write(tmp_path, [{"prompt": f"q{i // 4}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                            for i in range(40)], "jsonl", "many")
    for settings in (DPOSettings(dataset_id=str(many), eval_split=0.1),
                     DPOSettings(dataset_mixture={"datasets": [{"id": str(many), "weight": 1.0}], "seed": 3,
                                                  "test_split_size": 3})):
        train, held_out = load_train_eval("preference", settings)
        assert not set(train["prompt"]) & set(held_out["prompt"])
        assert len(held_out) == 4 and len(train) == 36  # one whole prompt: its 4 pairs
    train, held_out = split(load_preferences(str(many)), DPOSettings(dataset_id=str(many), eval_split=0.2),
                            "preference")  # reward.py's call
    assert not set(train["prompt"]) & set(held_out["prompt"]) and len(held_out) == 8
    unique = write(tmp_path, [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}
                              for i in range(40)], "jsonl", "unique")
    settings = DPOSettings(dataset_id=str(unique), eval_split=0.1)
    plain = load_preferences(str(unique)).shuffle(seed=settings.seed).train_test_split(test_size=0.1, shuffle=False)
    train, held_out = load_train_eval("preference", settings)
    assert held_out["prompt"] == plain["test"]["prompt"] and train["prompt"] == plain["train"]["prompt"]


def test_sft_rows_are_held_out_by_whole_prompts_deterministically(tmp_path, alignkit_log):
    """label.py --mode completions --num_samples 4 writes several answers per prompt; held out row by row, a prompt's
    other answers trained, so sft.py's held-out loss measured prompts the model had learned. A conversation's prompt
    is its turns before the last assistant one. The split is the same for a seed, and with one row per prompt (or
    plain text, which has no prompt) it is the plain split it always was."""
    from alignkit.core.mixture import load_train_eval
    from alignkit.core.train_settings import SFTSettings

    alignkit_log.set_level(logging.INFO, logger="alignkit")

    def prompts(data):  # each row's prompt, as the split groups it
        return [json.dumps(row.get("prompt") or row["messages"][:-1], sort_keys=True) for row in data]

    completions = write(tmp_path, [{"prompt": f"q{i // 4}", "completion": f"answer {i}"} for i in range(40)],
                        "jsonl", "completions")
    conversations = write(tmp_path, [{"messages": [u("hi"), a("hello"), u(f"q{i // 4}"), a(f"answer {i}")]}
                                     for i in range(40)], "jsonl", "conversations")
    for data in (completions, conversations):
        for settings in (SFTSettings(dataset_id=str(data), eval_split=0.1),
                         SFTSettings(dataset_id=str(data), eval_split=0.1, seed=7),
                         SFTSettings(dataset_mixture={"datasets": [{"id": str(data), "weight": 1.0}], "seed": 3,
                                                      "test_split_size": 3})):
            alignkit_log.clear()
            train, held_out = load_train_eval("sft", settings)
            assert not set(prompts(train)) & set(prompts(held_out)), data
            assert len(held_out) == 4 and len(train) == 36  # one whole prompt: its 4 answers
            assert "4 of 40 rows held out, every one to 1 of the 10 prompts" in alignkit_log.text
            again = load_train_eval("sft", settings)  # the same rows on each side, in the same order
            assert (again[0][:], again[1][:]) == (train[:], held_out[:])
    unique = write(tmp_path, [{"messages": [u(f"q{i}"), a(f"answer {i}")]} for i in range(40)], "jsonl", "unique")
    texts = write(tmp_path, [{"text": f"text {i // 4}"} for i in range(40)], "jsonl", "texts")
    for data in (unique, texts):
        settings = SFTSettings(dataset_id=str(data), eval_split=0.1)
        plain = load_sft(str(data)).shuffle(seed=settings.seed).train_test_split(test_size=0.1, shuffle=False)
        train, held_out = load_train_eval("sft", settings)
        assert held_out[:] == plain["test"][:] and train[:] == plain["train"][:]


def test_a_held_out_prompt_is_not_answered_in_training_and_a_huge_prompt_does_not_take_the_share(tmp_path):
    """Found by a review of the whole-prompt split: (1) a conversation cut into one row per turn ([q, x] beside
    [q, x, f, y]) held [q, x] out while every training row taught x after q; (2) one prompt of 900 rows beside 100
    of one row each held out 900 rows for --eval_split 0.05 (asked: 50)."""
    from alignkit.core.mixture import _hold_out, load_train_eval
    from alignkit.core.train_settings import SFTSettings

    turns = write(tmp_path, [{"messages": [u("q"), a("x"), u(f"f{i}"), a(f"y{i}")]} for i in range(9)]
                  + [{"messages": [u("q"), a("x")]}] + [{"messages": [u(f"p{i}"), a(f"z{i}")]} for i in range(10)],
                  "jsonl", "turns")
    data = load_sft(str(turns))
    for seed in (1, 2, 3, 42):
        train, held_out = _hold_out(data.shuffle(seed=seed), 1, seed, "eval_split", "sft")
        sides = [{m["content"] for row in part for m in row["messages"]} for part in (train, held_out)]
        assert "x" not in sides[0] or "x" not in sides[1], seed  # q's answer on one side only
    skewed = write(tmp_path, [{"messages": [u("Summarize the text below."), a(f"summary {i}")]} for i in range(900)]
                   + [{"messages": [u(f"question {i}"), a(f"answer {i}")]} for i in range(100)], "jsonl", "skewed")
    for seed in (1, 2, 42):
        train, held_out = load_train_eval("sft", SFTSettings(dataset_id=str(skewed), eval_split=0.05, seed=seed))
        assert len(held_out) == 50 and len(train) == 950, seed
        assert all(row["messages"][0]["content"] != "Summarize the text below." for row in held_out)


def test_an_unknown_sft_column_of_text_names_trl_s_dataset_text_field(tmp_path):
    """Text under another column name stopped with "rename the columns, or --dataset_format ..." and not TRL's own
    way, which works: --dataset_text_field (found by an sft.py audit)."""
    from alignkit.core.data import load_sft

    path = tmp_path / "body.jsonl"
    path.write_text('{"id": 1, "body": "hello there"}\n{"id": 2, "body": "general kenobi"}\n')
    with pytest.raises(DataError, match=r"For plain text in one column, --dataset_text_field body\.$"):
        load_sft(str(path))
    assert load_sft(str(path), text_field="body")["text"] == ["hello there", "general kenobi"]
