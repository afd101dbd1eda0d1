"""A notebook's cells run out of order: each training is the one its 'Run folder' cell decided (alignkit.train.
run_folder's prepare_run and start_run call these), on the data its 'Data' cell read under these settings.

A notebook keeps every variable of a cell that ran before: a Data cell that failed leaves the earlier data, a training
cell run again trains the model in memory again, a settings cell run alone changes what the folder records. Each
such training is refused in one line naming the cells to run again.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

from alignkit.core.saved_settings import config_to_dict
from alignkit.core.errors import UserError

# Run folders prepare_run decided in this process, each with what it decided for (Prepared): start_run trains only
# on that, once. A notebook's training cell run again, or after the settings, the data or the model changed without
# the cells before it, would otherwise train a model in memory as a run it is not.
PREPARED: dict[Path, "Prepared"] = {}
# Run folders whose training finished in this process, each with the settings it trained with: the cell that saves it
# (alignkit.train.training.finish) saves that training only, under those settings.
TRAINED: dict[Path, dict] = {}
# Run folders start_run claimed in this process (STARTED), and those whose `with start_run(...)` block runs now
# (TRAINING): a trainer of one trains inside that block only (check_in_training_cell).
STARTED: set[Path] = set()
TRAINING: set[Path] = set()


def check_in_training_cell(folder) -> None:
    """A trainer's train() outside the training cell's `with start_run(...)` block, for a run folder start_run
    claimed in this process, refused in one line: `trainer.train()` typed into a notebook after the run finished
    trained it again from step 0, over its last checkpoints and its card (the notebook audit of session 32). A
    trainer built apart from alignkit's run folders trains as it would."""
    folder = Path(folder).resolve()
    if folder in STARTED and folder not in TRAINING:
        raise UserError(f"trainer.train() outside the training cell: {folder.name} trains inside its 'with "
                        "start_run(...)' block, which checks the run first. Run the cells from 'Run folder' on "
                        "again (Run folder, Model, Train): the run resumes from its last checkpoint, or trains "
                        "nothing where it finished")


def check_read_under(s, data) -> None:
    """Data read under other settings than these (a notebook's Data cell that failed after the settings changed
    leaves the earlier data in place: the run trained on it and recorded the new dataset): refused in one line."""
    from alignkit.core.mixture import READ_UNDER, data_settings

    now = data_settings(s)
    for then in (getattr(d, READ_UNDER, None) for d in data if d is not None):
        changed = sorted(k for k in then or {} if then[k] != now.get(k))  # of those its rows depend on
        if changed:
            raise UserError(f"the data was read under other settings than these ({', '.join(changed)} changed "
                            "since): run the 'Data' cell again, then the cells after it")


@dataclasses.dataclass
class Prepared:
    settings: dict  # config_to_dict of the settings prepare_run decided with (a copy: edits in place count)
    resume_from: str | None
    data: tuple  # each dataset's fingerprint (or identity), in prepare_run's order
    given: str = ""  # the folder as the settings named it, and the working folder then (a relative path
    cwd: str = ""  # names another folder after a notebook's %cd)
    used: bool = False  # a training started from this decision


def fingerprints(data) -> tuple:
    return tuple(None if d is None else (getattr(d, "_fingerprint", None), id(d)) for d in data)


def check_prepared(s, folder: Path, resume_from: str | None, model, data, stopped: str | None = None,
                   built=()) -> None:
    """Refuse, in one line naming the cells to run again, a training that is not the one prepare_run decided: the
    training cell run a second time (it trained the model in memory again as a fresh run, unlocked), settings or
    data changed since (the folder recorded settings its model was not trained with), a model (or each of `built`,
    (thing, its cell) pairs such as rl.py's rewards) built under other settings (a settings change with the Model
    cell skipped trained the old model under the new settings' records), or a model trained by an earlier training
    cell started over (with no checkpoint to resume, the trained adapter went on training)."""
    prepared = PREPARED.get(folder.resolve())
    again = "run the cells from 'Run folder' on again (Run folder, Model, Train)"
    moved = [p for p in PREPARED.values() if prepared is None and p.given == str(folder) and p.cwd != os.getcwd()]
    if moved:
        raise UserError(f"the working folder changed since the 'Run folder' cell ran ({moved[-1].cwd}, now "
                        f"{os.getcwd()}), so {folder} names another folder: change back (%cd {moved[-1].cwd}), or "
                        f"{again}")
    # Settings changed first: the cells to run start at 'Data' (after a refused Run folder cell, the earlier decision
    # is still here, used: "run the cells from 'Run folder'" led back to that cell's refusal).
    if prepared is not None and (changed := _changed(prepared.settings, s)):
        raise UserError(f"the settings changed since the 'Run folder' cell ran ({', '.join(changed)}): run the "
                        "cells from 'Data' on again, then train")
    named = Path(s.output_dir) / s.run_name if getattr(s, "run_name", None) and hasattr(s, "output_dir") else None
    if prepared is None and named is not None and named.resolve() != folder.resolve():
        raise UserError(f"the settings name the run folder {named}, but the 'Run folder' cell last gave {folder}: "
                        f"{again}")
    if prepared is None or prepared.used:
        why = (f"trained in this session, and stopped ({stopped})" if stopped else "already trained in this session") \
            if prepared else "not prepared for training (the 'Run folder' cell did not run for it)"
        raise UserError(f"{folder} was {why}: {again}; it resumes from the last checkpoint, or starts over where "
                        "the settings changed")
    for thing, cell in ((model, "Model"), *built):  # the model, rl.py's rewards: built under these settings
        under = getattr(thing, "_alignkit_built_under", None)
        if under is not None and (changed := _changed(under, s, _not_built_from())):
            raise UserError(f"the {cell.lower()} in memory {'were' if cell.endswith('s') else 'was'} built under "
                            "other settings than these "
                            f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''} changed since): run the "
                            f"'{cell}' cell again, then train")
    if data and fingerprints(data) != prepared.data or resume_from != prepared.resume_from:
        raise UserError(f"the data or the checkpoint to resume from is not what the 'Run folder' cell decided for "
                        f"{folder.name}: {again}")
    if resume_from is None and getattr(model, "_alignkit_trained_in", None) is not None:
        raise UserError(f"this model was trained by an earlier training cell ({model._alignkit_trained_in}) and "
                        "there is no checkpoint to resume: run the 'Model' cell again for a fresh adapter, then train")


def _not_built_from() -> set[str]:
    """Settings nothing built before the training reads (the training loop's, the run folder's and logging's, the
    Hub's, the data's, which its own cell reads and prepare_run checks): changed, a model in memory still stands (a
    lower learning rate to resume with needs no reload). Any other change, one a model may be built from, needs it."""
    from alignkit.core.groups import TRAIN_HELP_GROUPS

    groups = dict(TRAIN_HELP_GROUPS)
    return {*groups["training"], *groups["run folder, logging and checkpoints"], *groups["Hub and merging"],
            *groups["data"]} - {"seed"}  # the seed draws a fresh adapter's first weights


def _changed(then: dict, s, ignore=()) -> list[str]:
    now = config_to_dict(s)  # alignkit hands PEFT and TRL copies: a change here is the user's
    return sorted(k for k in then.keys() | now.keys() if then.get(k) != now.get(k) and k not in ignore)


def check_before_config(s, folder: Path, stopped: str | None = None) -> None:
    """A training cell's first step (TRL's config, which resets accelerate's state that the model trained in memory
    still uses) refused, as start_run would refuse it, where prepare_run's decision was used or the settings
    changed since; nothing is checked for a folder prepare_run did not decide (a config built on its own)."""
    prepared = PREPARED.get(folder.resolve())
    if prepared is not None and (prepared.used or _changed(prepared.settings, s)):
        check_prepared(s, folder, prepared.resume_from, None, (), stopped)


def check_trainer_folder(trainer, folder: Path) -> None:
    """Refuse to save a trainer that trained another folder (a notebook's training cell refused for a new run folder
    leaves the earlier run's trainer in memory: saved, its weights went into the new folder, recorded as this run)."""
    trained_into = getattr(getattr(trainer, "args", None), "output_dir", None)
    if trained_into is not None and Path(trained_into) != Path(folder) and \
            Path(trained_into).resolve() != Path(folder).resolve():
        raise UserError(f"the trainer in memory trained {trained_into}, not {folder}: nothing saved. Run the cells "
                        "from 'Run folder' on (Run folder, Model, Train), then this one")


def trained(s, folder: Path) -> None:
    TRAINED[folder.resolve()] = copy.deepcopy(config_to_dict(s))


def check_saved(s, folder: Path, ignore=()) -> None:
    """Refuse, in one line, to save a training under other settings than it trained with (a notebook's settings cell
    run again, then the saving cell: the new model_id would be recorded as the adapter's base) or one that prepare_run
    decided and that never trained in this process (a saving cell run before the training cell)."""
    then = TRAINED.get(folder.resolve())
    if then is None and folder.resolve() not in PREPARED:
        return  # a trainer built and trained without prepare_run (a library's own use): nothing to compare with
    if then is None:
        raise UserError(f"nothing was trained into {folder} in this session: run the cells from 'Run folder' on "
                        "(Run folder, Model, Train), then this one")
    if changed := _changed(then, s, ignore):  # `ignore`: what saving may change (--merge_adaptors, --push_to_hub, ...)
        raise UserError(f"the settings changed since {folder.name} trained ({', '.join(changed)}): saving would "
                        "record them for a model trained with others. Set them back and run this cell again, or run "
                        "the cells from 'Data' on again (Data, Run folder, Model, Train), then this one")


def remember(s, folder: Path, resume_from: str | None, data) -> None:
    """What prepare_run decided for `folder`, for start_run's check."""
    PREPARED[folder.resolve()] = Prepared(copy.deepcopy(config_to_dict(s)), resume_from, fingerprints(data),
                                          str(folder), os.getcwd())


def forget(folder: Path) -> None:
    PREPARED.pop(folder.resolve(), None)


def used(folder: Path) -> None:
    PREPARED[folder.resolve()].used = True
