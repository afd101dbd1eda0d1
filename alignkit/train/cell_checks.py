"""A notebook's cells run out of order: each training is the one its 'Run folder' cell decided (alignkit.train.
run_folder's prepare_run and start_run call these), on the data its 'Data' cell read under these settings.

A notebook keeps every variable of a cell that ran before: a Data cell that failed leaves the earlier data, a training
cell run again trains the model in memory again, a settings cell run alone changes what the folder records. Each
such training is refused in one line naming the cells to run again: the notebook's own (its settings class's
notebook_cells: rl.py's are Prompts, Run folder, Rewards, Model, ...), and of those only the ones that read a setting
that changed (not_read_by).
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
# The notebook cells of the script that prepared each run folder in this process (its settings class's), for the
# checks that have the folder only.
CELLS: dict[Path, dict[str, str]] = {}


def notebook_cells(s=None, folder=None) -> dict[str, str]:
    """The notebook cells of the script whose settings are `s` (by what each does: see TrainSettings.notebook_cells),
    else of the one that prepared `folder` in this process, else the training scripts' usual ones."""
    from alignkit.core.groups import TrainSettings

    if s is None and folder is not None and (cells := CELLS.get(Path(folder).resolve())):
        return cells
    return getattr(type(s), "notebook_cells", None) or TrainSettings.notebook_cells


def cells_from(cells: dict[str, str], role: str = "run folder", again: bool = False) -> str:
    """"the cells from 'Run folder' on[ again] (Run folder, Model, Train)": the notebook's, from the `role` cell to
    training."""
    roles = list(cells)
    titles = list(dict.fromkeys(cells[r] for r in roles[roles.index(role):roles.index("train") + 1]))
    return f"the cells from '{titles[0]}' on{' again' if again else ''} ({', '.join(titles)})"


def these_cells(titles: list[str]) -> str:
    """"the 'Run folder' cell", "the 'Run folder', 'Model' and 'Train' cells"."""
    named = [f"'{title}'" for title in titles]
    return f"the {named[0]} cell" if len(named) == 1 else f"the {', '.join(named[:-1])} and {named[-1]} cells"


def _in_order(cells: dict[str, str], *roles: str) -> list[str]:
    """The titles of the cells of these roles (a role the notebook lacks: as given), in the notebook's order."""
    order = list(cells)
    ranked = sorted(roles, key=lambda role: order.index(role) if role in order else len(order))
    return list(dict.fromkeys(cells.get(role, role) for role in ranked))


def not_read_by(s, role: str) -> set[str]:
    """Settings the notebook's `role` cell does not read (its settings class's not_read_by, and for every script's
    Data and Model cells the training loop's, the run folder's and the Hub's): changed, what it built stands."""
    own = set(getattr(type(s), "not_read_by", {}).get(role, ()))
    read = set(getattr(type(s), "read_by", {}).get(role, ()))  # what the class says its cell reads after all
    if role == "model":
        return (own | _not_built_from()) - read
    if role == "data":
        return (own | _not_read_by_data()) - read
    return own - read


def to_run_again(s, changed, trained: bool) -> list[str]:
    """The titles of the notebook cells to run again, up to and with its Train cell, after the settings `changed`
    since its Run folder cell ran: the Data, Model and (rl.py) Rewards cells only where they read one of them (the
    Model cell also where a training trained the model in memory: a fresh adapter), every other one always."""
    cells, titles = notebook_cells(s), []
    skippable = {"data", "model", *getattr(type(s), "not_read_by", {})}
    for role, title in cells.items():
        if role in ("settings", "save"):
            continue
        if (role not in skippable or set(changed) - not_read_by(s, role) or (trained and role == "model")) and \
                title not in titles:
            titles.append(title)
        if role == "train":
            break
    return titles


def check_in_training_cell(folder) -> None:
    """A trainer's train() outside the training cell's `with start_run(...)` block, for a run folder start_run
    claimed in this process, refused in one line: `trainer.train()` typed into a notebook after the run finished
    trained it again from step 0, over its last checkpoints and its card (the notebook audit of session 32). A
    trainer built apart from alignkit's run folders trains as it would."""
    folder = Path(folder).resolve()
    if folder in STARTED and folder not in TRAINING:
        raise UserError(f"trainer.train() outside the training cell: {folder.name} trains inside its 'with "
                        f"start_run(...)' block, which checks the run first. Run "
                        f"{cells_from(notebook_cells(folder=folder), again=True)}: the run resumes from its last "
                        "checkpoint, or trains nothing where it finished")


def check_read_under(s, data) -> None:
    """Data read under other settings than these (a notebook's Data cell that failed after the settings changed
    leaves the earlier data in place: the run trained on it and recorded the new dataset): refused in one line."""
    from alignkit.core.mixture import READ_UNDER

    for then in (getattr(d, READ_UNDER, None) for d in data if d is not None):
        changed = sorted(k for k in then or {} if then[k] != getattr(s, k, None))  # of those its rows depend on
        if changed:
            raise UserError(f"the data was read under other settings than these ({', '.join(changed)} changed "
                            f"since): run the '{notebook_cells(s)['data']}' cell again, then the cells after it")


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
    (thing, its cell's role) pairs such as rl.py's rewards) built under other settings (a settings change with the Model
    cell skipped trained the old model under the new settings' records), or a model trained by an earlier training
    cell started over (with no checkpoint to resume, the trained adapter went on training). Each names the cells of
    the notebook of `s` (TrainSettings.notebook_cells)."""
    prepared = PREPARED.get(folder.resolve())
    cells = notebook_cells(s)
    again = f"run {cells_from(cells, again=True)}"
    moved = [p for p in PREPARED.values() if prepared is None and p.given == str(folder) and p.cwd != os.getcwd()]
    if moved:
        raise UserError(f"the working folder changed since the '{cells['run folder']}' cell ran ({moved[-1].cwd}, now "
                        f"{os.getcwd()}), so {folder} names another folder: change back (%cd {moved[-1].cwd}), or "
                        f"{again}")
    # Settings changed first: the cells to run are those that read them (after a refused Run folder cell, the earlier
    # decision is still here, used), the Data cell first where it does (else the Run folder cell refuses its data).
    if prepared is not None and (changed := _changed(prepared.settings, s)):
        trained = prepared.used or getattr(model, "_alignkit_trained_in", None) is not None
        raise UserError(f"the settings changed since the '{cells['run folder']}' cell ran ({', '.join(changed)}): run "
                        f"{these_cells(to_run_again(s, changed, trained)[:-1])} again, then train")
    named = Path(s.output_dir) / s.run_name if getattr(s, "run_name", None) and hasattr(s, "output_dir") else None
    if prepared is None and named is not None and named.resolve() != folder.resolve():
        raise UserError(f"the settings name the run folder {named}, but the '{cells['run folder']}' cell last gave "
                        f"{folder}: {again}")
    if prepared is None or prepared.used:
        why = (f"trained in this session, and stopped ({stopped})" if stopped else "already trained in this session") \
            if prepared else f"not prepared for training (the '{cells['run folder']}' cell did not run for it)"
        raise UserError(f"{folder} was {why}: {again}; it resumes from the last checkpoint, or starts over where "
                        "the settings changed")
    # The model and rl.py's rewards: built under these settings (of those each reads), and a model an earlier training
    # cell trained only where it resumes. A refusal gives the Run folder cell's decision back
    # (run_folder._given_back_if_refused): that cell runs again too, and each cell one refusal would lead to next.
    stale = {role: changed for thing, role in ((model, "model"), *built)
             if (under := getattr(thing, "_alignkit_built_under", None)) is not None
             and (changed := _changed(under, s, not_read_by(s, role)))}
    retrained = resume_from is None and getattr(model, "_alignkit_trained_in", None) is not None
    if stale:
        role, changed = next(iter(stale.items()))
        rerun = _in_order(cells, "run folder", *stale, *(["model"] if retrained else []))
        raise UserError(f"the {role} in memory {'were' if role.endswith('s') else 'was'} built under "
                        "other settings than these "
                        f"({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''} changed since): run "
                        f"{these_cells(rerun)} again, then train")
    if data and fingerprints(data) != prepared.data or resume_from != prepared.resume_from:
        raise UserError(f"the data or the checkpoint to resume from is not what the '{cells['run folder']}' cell "
                        f"decided for {folder.name}: {again}")
    if retrained:
        raise UserError(f"this model was trained by an earlier training cell ({model._alignkit_trained_in}) and "
                        f"there is no checkpoint to resume: run {these_cells(_in_order(cells, 'run folder', 'model'))} "
                        "again for a fresh adapter, then train")


def _not_built_from() -> set[str]:
    """Settings nothing built before the training reads (the training loop's, the run folder's and logging's, the
    Hub's, the data's, which its own cell reads and prepare_run checks): changed, a model in memory still stands (a
    lower learning rate to resume with needs no reload). Any other change, one a model may be built from, needs it."""
    from alignkit.core.groups import TRAIN_HELP_GROUPS

    groups = dict(TRAIN_HELP_GROUPS)
    return {*groups["training"], *groups["run folder, logging and checkpoints"], *groups["Hub and merging"],
            *groups["data"]} - {"seed"}  # the seed draws a fresh adapter's first weights


def _not_read_by_data() -> set[str]:
    """Settings no Data cell reads: the training loop's (not the seed, the length nor trainer_overrides, which a
    script may check its rows against), the run folder's and logging's, the Hub's, LoRA's and LoTA's."""
    from alignkit.core.groups import TRAIN_HELP_GROUPS

    groups = dict(TRAIN_HELP_GROUPS)
    return {*groups["training"], *groups["run folder, logging and checkpoints"], *groups["Hub and merging"],
            *groups["LoRA"], *groups["LoTA (--adapter lota)"]} - {"seed", "max_length", "trainer_overrides"}


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
        raise UserError(f"the trainer in memory trained {trained_into}, not {folder}: nothing saved. Run "
                        f"{cells_from(notebook_cells(folder=folder))}, then this one")


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
        raise UserError(f"nothing was trained into {folder} in this session: run {cells_from(notebook_cells(s))}, "
                        "then this one")
    if changed := _changed(then, s, ignore):  # `ignore`: what saving may change (--merge_adaptors, --push_to_hub, ...)
        raise UserError(f"the settings changed since {folder.name} trained ({', '.join(changed)}): saving would "
                        "record them for a model trained with others. Set them back and run this cell again, or run "
                        f"{these_cells(to_run_again(s, changed, trained=True))} again, then this one")


def remember(s, folder: Path, resume_from: str | None, data) -> None:
    """What prepare_run decided for `folder`, for start_run's check."""
    PREPARED[folder.resolve()] = Prepared(copy.deepcopy(config_to_dict(s)), resume_from, fingerprints(data),
                                          str(folder), os.getcwd())
    CELLS[folder.resolve()] = notebook_cells(s)


def forget(folder: Path) -> None:
    PREPARED.pop(folder.resolve(), None)


def used(folder: Path) -> None:
    PREPARED[folder.resolve()].used = True
