"""The one progress rule (alignkit.core.progress): bars in a terminal and in a notebook, none in CI logs, and
every place a person waits (training, library bars, the reference pass, MT-Bench answers) follows it."""

from __future__ import annotations

import builtins
import io
import re

import pytest
import torch

from alignkit.core import progress
from alignkit.core.config import DPOSettings
from alignkit.train import training


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


class Recorded(dict):
    """A stand-in TRL config class that records its kwargs."""

    def __init__(self, **kwargs):
        super().__init__(kwargs)
        self.n_gpu = 1


@pytest.fixture
def where(monkeypatch):
    """where(ci=..., tty=..., notebook=...): set up the surroundings the rule reads."""

    def setup(ci: bool = False, tty: bool = False, notebook: bool = False, stdin_tty: bool = False):
        monkeypatch.delenv("CI", raising=False)
        if ci:
            monkeypatch.setenv("CI", "true")
        monkeypatch.setattr("sys.stderr", Stream(tty))
        monkeypatch.setattr("sys.stdin", Stream(stdin_tty))
        monkeypatch.setattr("sys.argv", ["dpo.py"])
        if notebook:
            monkeypatch.setattr(builtins, "get_ipython", lambda: None, raising=False)
        else:
            monkeypatch.delattr(builtins, "get_ipython", raising=False)

    return setup


@pytest.mark.parametrize("case, expected", [
    (dict(tty=True), True),  # a terminal
    (dict(notebook=True), True),  # ipykernel: stderr is no TTY
    (dict(stdin_tty=True), True),  # python dpo.py 2>&1 | tee log, typed in a terminal
    (dict(), False),  # a batch job: nothing interactive
    (dict(ci=True, tty=True), False),  # CI wins, even with a TTY
    (dict(ci=True, notebook=True), False),
])
def test_the_rule(where, case, expected):
    where(**case)
    assert progress.live() is expected


def test_training_shows_its_bar_in_a_notebook_and_not_in_ci(where, tmp_path):
    s = DPOSettings(report_to="none")
    where(notebook=True)  # stderr not a TTY: the old rule (`not sys.stderr.isatty()`) hid the bar here
    assert training.trl_config(Recorded, s, tmp_path, torch.float32)["disable_tqdm"] is False
    where(ci=True, tty=True)
    assert training.trl_config(Recorded, s, tmp_path, torch.float32)["disable_tqdm"] is True


def test_library_bars_follow_the_rule(where):
    import datasets
    import transformers

    from alignkit.core.progress import quiet_library_noise

    try:
        where(notebook=True)
        datasets.disable_progress_bars()  # as an earlier run in the process (a CI-like cell) left them
        quiet_library_noise()
        assert transformers.utils.logging.is_progress_bar_enabled()
        assert not datasets.utils.are_progress_bars_disabled()
        where(ci=True)
        quiet_library_noise()
        assert not transformers.utils.logging.is_progress_bar_enabled()
        assert datasets.utils.are_progress_bars_disabled()
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()


def test_bar_draws_in_a_notebook_only_on_the_main_process(where):
    where(notebook=True)
    assert not progress.bar(range(3), total=3).disable
    assert progress.bar(range(3), main_process=False, total=3).disable
    where()
    assert progress.bar(range(3), total=3).disable


def test_progress_logs_instead_of_drawing_in_ci(where, alignkit_log):
    where(ci=True)
    with progress.Progress("answering", 4, unit="question", errors=False) as p:
        assert p.bar is None
        p.update(4)
    assert "answering: 4/4 questions" in alignkit_log.text and "errors" not in alignkit_log.text
    # All done before (a rerun that found every judgment in its cache): said so, not "87/87 pairs, 0.0/s" (the
    # label.py audit of session 68); a rate counts this run's only.
    alignkit_log.clear()
    with progress.Progress("judging", 87, done=87):
        pass
    assert "judging: 87/87 pairs (87 done before), 0 errors" in alignkit_log.text and "/s" not in alignkit_log.text
    with progress.Progress("judging", 87, done=80) as p:
        p.update(7)
    assert re.search(r"judging: 87/87 pairs \(80 done before\), [0-9.]+/s, 0 errors", alignkit_log.text)


def test_mt_bench_answers_show_a_bar(where, monkeypatch, tmp_path):
    from alignkit.evals import mtbench

    where(notebook=True)
    bars = []
    real = progress.Progress

    def spy(*args, **kwargs):
        bars.append(real(*args, **kwargs))
        return bars[-1]

    monkeypatch.setattr(mtbench, "Progress", spy)

    class S:
        temperature, top_p, num_beams, max_new_tokens, batch_size, seed = 0.0, 1.0, 1, 4, 2, 0

    questions = [{"question_id": i, "category": "writing", "turns": ["hi", "again"]} for i in range(3)]
    answered = mtbench.generate_answers(lambda convs, **kw: ["ok"] * len(convs), questions, "m", "src",
                                        tmp_path / "answers.jsonl", S())
    assert answered == 3
    (bar,) = bars
    assert bar.bar is not None and bar.done == 3 and bar.total == 3


def test_vibes_answers_show_a_bar_counted_batch_by_batch(where, monkeypatch, tiny_cache):
    """evaluate.py vibes was silent between loading the weights and printing the answers: minutes on a 7B."""
    from alignkit.evals import evaluation

    where(notebook=True)
    bars = []

    class Spy(progress.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.updates = []
            bars.append(self)

        def update(self, n=1, errors=None):
            self.updates.append(n)
            super().update(n, errors)

    monkeypatch.setattr(evaluation, "Progress", Spy)
    _, s = evaluation.parse_command(["vibes", "--preset", "tiny", "--prompts", "name three fruits.",
                                     "name three colours.", "hi", "--max_new_tokens", "3", "--batch_size", "2"])
    prompts, sources, answers = evaluation.vibes(s, "transformers")
    (bar,) = bars
    assert bar.bar is not None and bar.total == len(prompts) == len(answers[sources[0]])  # the preset's prompts too
    assert sum(bar.updates) == len(prompts) and set(bar.updates[:-1]) == {2}  # a batch at a time


def test_trl_s_implicit_prompt_warning_is_said_once_whatever_prompt_it_names(capsys):
    """TRL's "This warning is shown once" keys on its text, which ends with each prompt's left-out end: a dataset
    whose template renders the prompt apart got a line per distinct ending."""
    import logging

    from alignkit.core.progress import quiet_library_noise

    quiet_library_noise()
    quiet_library_noise()  # a second call adds no second filter
    for trainer in ("dpo_trainer", "sft_trainer", "kto_trainer"):  # TRL says it alike in the three
        trl_logger = logging.getLogger(f"trl.trainer.{trainer}")
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        trl_logger.addHandler(handler)
        try:
            for end in ("<|assistant|>", "\n", "<|end|>"):
                trl_logger.warning("The tokenized prompt is not a prefix of the tokenized prompt+completion: %r", end)
            trl_logger.warning("another warning")
        finally:
            trl_logger.removeHandler(handler)
        assert [r.getMessage()[:30] for r in records] == ["The tokenized prompt is not a ", "another warning"]
