"""Bad evaluation inputs get one line naming the file, line (or row) and field, and the fix, as bad training data
does (test_data_inputs.py): prompts files (--prompts_file), eval sets and reference outputs (--eval_set,
--reference_outputs), MT-Bench's questions, judge prompts and answer files, and judge prompt files
(--judge_template). Each is read in-process here, with no model loaded: alignkit.evals.mtbench,
alignkit.evals.alpacaeval_outputs and alignkit.core.journal.read_jsonl, which they all read JSONL through."""

import re

import pytest

from alignkit.core.data_files import DataError
from alignkit.core.errors import ConfigError
from alignkit.core.journal import read_jsonl
from alignkit.evals import alpacaeval_outputs, mtbench, prompts_file

LATIN1 = b'{"prompt": "caf\xe9"}\n'  # "café" saved as Latin-1 (Windows-1252): byte 0xe9 is not UTF-8 there
BOM = b"\xef\xbb\xbf"  # what Notepad and Excel's "CSV UTF-8" put at the start of a UTF-8 file
FORMATS = '--prompts_file takes JSONL (one {"prompt": ...} object a line) or a .txt file (one prompt a line)'


def exactly(message: str) -> str:
    """A pytest.raises `match` for the whole message and nothing else."""
    return f"^{re.escape(message)}$"


def not_utf8(path, line: int, byte: int, column: int) -> str:
    return exactly(f"{path}: line {line}: not UTF-8 text (byte 0x{byte:02x} at column {column}). Save the file as "
                   "UTF-8.")


def write(path, data: bytes):
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- 1. not UTF-8: one line, not a UnicodeDecodeError
def test_a_prompts_file_that_is_not_utf8_names_the_line_byte_and_fix(tmp_path):
    jsonl = write(tmp_path / "ev_latin1.jsonl", b'{"prompt": "hi"}\n' + LATIN1)
    with pytest.raises(DataError, match=not_utf8(jsonl, 2, 0xE9, 16)):
        prompts_file.prompt_questions(jsonl)
    txt = write(tmp_path / "ev_latin1.txt", b"hi\ncaf\xe9\n")
    with pytest.raises(DataError, match=not_utf8(txt, 2, 0xE9, 4)):
        prompts_file.prompt_questions(txt)


def test_an_eval_set_or_reference_file_that_is_not_utf8_names_the_line_byte_and_fix(tmp_path):
    array = write(tmp_path / "eval.json", b'[\n  {"instruction": "caf\xe9"}\n]\n')
    with pytest.raises(DataError, match=not_utf8(array, 2, 0xE9, 23)):
        alpacaeval_outputs.read_rows(array, "--eval_set")
    lines = write(tmp_path / "refs.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError, match=not_utf8(lines, 1, 0xE9, 21)):
        alpacaeval_outputs.read_rows(lines, "--reference_outputs")


def test_mt_bench_files_and_judge_prompts_that_are_not_utf8_name_the_line_byte_and_fix(tmp_path):
    questions = write(tmp_path / "question.jsonl", b'{"question_id": 1, "category": "writing", "turns": ["caf\xe9"]}\n')
    with pytest.raises(DataError, match=not_utf8(questions, 1, 0xE9, 57)):
        mtbench.load_questions(questions)
    prompts = write(tmp_path / "judge_prompts.jsonl", b'{"name": "pair-v2", "system_prompt": "\xe9"}\n')
    with pytest.raises(DataError, match=not_utf8(prompts, 1, 0xE9, 39)):
        mtbench.load_judge_prompts(prompts)
    answers = write(tmp_path / "model.jsonl", b'{"question_id": 1, "choices": [{"index": 0, "turns": ["\xe9"]}]}\n')
    with pytest.raises(DataError, match=not_utf8(answers, 1, 0xE9, 56)):
        mtbench.read_answers(answers)  # an answer log: read with repair_tail, and still not taken as torn
    from alignkit.feedback.judge_templates import load_template

    with pytest.raises(DataError, match=not_utf8(prompts, 1, 0xE9, 39)):
        load_template(str(prompts))


def test_a_log_cut_mid_character_is_still_repaired_but_a_whole_bad_line_is_an_error(tmp_path):
    """read_jsonl's repair_tail (append-only logs): a write killed mid-character leaves a torn last line, cut
    off as before; a whole last line that is not UTF-8 was written by someone else, and is reported."""
    good = '{"a": "é"}\n'.encode()
    torn = write(tmp_path / "torn.jsonl", good + '{"b": "é'.encode()[:-1])
    assert read_jsonl(torn, "fix it", repair_tail=True) == [(1, {"a": "é"})] and torn.read_bytes() == good
    edited = write(tmp_path / "edited.jsonl", good + b'{"b": "caf\xe9"}')
    with pytest.raises(DataError, match=not_utf8(edited, 2, 0xE9, 11)):
        read_jsonl(edited, "fix it", repair_tail=True)
    with pytest.raises(DataError, match=not_utf8(edited, 2, 0xE9, 11)):  # was read as "caf\ufffd", silently
        read_jsonl(edited, "fix it")


# ---------------------------------------------------------------- 2. a UTF-8 byte order mark is dropped
def test_a_byte_order_mark_is_accepted_as_the_training_data_loader_accepts_it(tmp_path):
    prompts = write(tmp_path / "prompts.jsonl", BOM + b'{"prompt": "hi"}\n{"prompt": "caf\xc3\xa9"}\n')
    assert [q["turns"] for q in prompts_file.prompt_questions(prompts)] == [["hi"], ["café"]]
    txt = write(tmp_path / "prompts.txt", BOM + b"hi\n")
    assert [q["turns"] for q in prompts_file.prompt_questions(txt)] == [["hi"]]  # no "\ufeffhi"
    row = {"instruction": "hi", "output": "x"}
    array = write(tmp_path / "eval.json", BOM + b'[{"instruction": "hi", "output": "x"}]')
    assert alpacaeval_outputs.read_rows(array, "--eval_set") == [(f"{array}, row 1", row)]
    lines = write(tmp_path / "eval.jsonl", BOM + b'{"instruction": "hi", "output": "x"}\n')
    assert alpacaeval_outputs.read_rows(lines, "--eval_set") == [(f"{lines}, line 1", row)]


# ---------------------------------------------------------------- 3. a format --prompts_file does not read
def test_a_json_array_or_a_table_as_prompts_file_names_the_formats_it_takes(tmp_path):
    for name, data in [("one_line.json", b'[{"prompt": "hi"}]\n'), ("pretty.json", b'[\n  {"prompt": "hi"}\n]\n'),
                       ("bom.jsonl", BOM + b'[{"prompt": "hi"}]')]:
        path = write(tmp_path / name, data)
        with pytest.raises(ConfigError, match=exactly(f"{path}: holds a JSON array; {FORMATS}: write each object "
                                                      "on a line of its own")):
            prompts_file.prompt_questions(path)
    table = write(tmp_path / "prompts.csv", b"prompt\nhi\n")
    with pytest.raises(ConfigError, match=exactly(f"{table}: a CSV file; {FORMATS}")):
        prompts_file.prompt_questions(table)
    other = write(tmp_path / "prompts.md", b"# my prompts\n")
    with pytest.raises(ConfigError, match=exactly(f"{other}, line 1: not valid JSON (Expecting value); {FORMATS}")):
        prompts_file.prompt_questions(other)


def test_vibes_prompts_replace_a_presets_and_a_txt_file_is_text_whatever_the_case_of_its_suffix(tmp_path):
    """The evaluate audit of session 31: `vibes --preset tiny --prompts "What is 2+2?"` asked the preset's 64
    prompts after the one given; P.TXT was read as JSONL ("not valid JSON"); `--num_beams 0` said "max_new_tokens,
    num_beams and batch_size must be >= 1" without naming the one at fault."""
    from alignkit.evals.evaluation import parse_command

    _, s = parse_command(["vibes", "--preset", "tiny", "--prompts", "What is 2+2?"])
    assert s.prompts == ["What is 2+2?"] and s.prompts_file is None
    _, s = parse_command(["vibes", "--preset", "tiny"])
    assert s.prompts == [] and s.prompts_file  # the preset's own prompts
    mine = write(tmp_path / "mine.jsonl", b'{"prompt": "hi"}\n')
    _, s = parse_command(["vibes", "--preset", "tiny", "--prompts", "a", "--prompts_file", str(mine)])
    assert s.prompts == ["a"] and s.prompts_file == str(mine)  # both given: both asked
    upper = write(tmp_path / "P.TXT", b"first prompt\nsecond prompt\n")
    assert [q["turns"][0] for q in prompts_file.prompt_questions(upper)] == ["first prompt", "second prompt"]
    for flag in ("num_beams", "batch_size", "max_new_tokens"):
        with pytest.raises(ConfigError, match=rf"^{flag} must be >= 1, got 0"):
            parse_command(["vibes", "--prompts", "hi", f"--{flag}", "0"])
    # A limit where none means all says so, as --max_prompts does ("max_questions must be >= 1" before)
    for argv in (["mt_bench", "--models", "a=x", "b=y", "--judge_model", "j", "--max_questions", "0"],
                 ["alpaca_eval", "--model_id", "x", "--max_instances", "-1"]):
        with pytest.raises(ConfigError, match=rf"^--{argv[-2][2:]} must be at least 1 \(or none: all\), got {argv[-1]}$"):
            parse_command(argv)


# ---------------------------------------------------------------- 4. the fix names the field that is wrong
@pytest.mark.parametrize("rows, says", [
    (b'{"prompt": "hi"}\n{"prompt": "yo", "question_id": "q0"}\n',
     "line 2: field 'question_id' must be an integer, got 'q0'; give every row its own integer \"question_id\", or "
     "leave the field out (rows are then numbered 1, 2, ...)"),
    (b'{"prompt": "hi", "category": 5}\n',
     "line 1: field 'category' must be a string, got 5; make \"category\" a string, or leave it out (the row then "
     "counts under \"prompts\")"),
    (b'{"text": "hi"}\n',
     "line 1: no field 'prompt'; its fields: text; each row needs \"prompt\": a non-empty string"),
    (b'{"promt": "hi"}\n',  # said "must be a string, got None"
     "line 1: no field 'prompt' (is 'promt' a misspelling of it?); its fields: promt; each row needs \"prompt\": a "
     "non-empty string"),
    (b'{"prompt": "a", "question_id": 1}\n{"prompt": "b", "question_id": 1}\n',  # said without row or id before
     "line 2: question_id 1 repeats line 1; give every row its own question_id, or none"),
    (b'{"prompt": "a"}\n{"prompt": "b", "question_id": 1}\n',
     "line 2: question_id 1 repeats line 1 (its row number: rows without one are numbered); give every row its own "
     "question_id, or none"),
], ids=["question_id", "category", "prompt", "misspelt prompt", "repeated id", "repeated row number"])
def test_a_bad_question_id_or_category_names_that_field_and_its_fix(tmp_path, rows, says):
    path = write(tmp_path / "prompts.jsonl", rows)
    with pytest.raises(ConfigError, match=exactly(f"{path}, {says}")):
        prompts_file.prompt_questions(path)


def test_an_integer_question_id_is_taken(tmp_path):
    path = write(tmp_path / "prompts.jsonl", b'{"prompt": "hi", "question_id": 7}\n{"prompt": "yo"}\n')
    assert [q["question_id"] for q in prompts_file.prompt_questions(path)] == [7, 2]  # an integer id is taken


def test_a_repeated_mt_bench_question_id_names_both_lines(tmp_path):
    """It said "line 3: question_id 81 appears twice", leaving the user to find the other (the evaluate.py audit of
    session 67); a prompts file's repeated id names both lines already."""
    row = '{{"question_id": {}, "category": "writing", "turns": ["hi"]}}\n'
    path = write(tmp_path / "question.jsonl", (row.format(81) + row.format(82) + row.format(81)).encode())
    with pytest.raises(ConfigError, match=exactly(f"{path}, line 3: question_id 81 repeats line 1; point "
                                                  "--mt_bench_data at FastChat's fastchat/llm_judge/data folder, or "
                                                  "fix the file")):
        mtbench.load_questions(path)
