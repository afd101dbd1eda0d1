"""The run folder: where a run lives, whether it resumes, and how it is claimed without losing an earlier one.

A run lives in `output_dir/run_name`: `alignkit_config.json` (the resolved settings, no secrets), TRL's
`checkpoint-N` folders, and at the end the adapter, the tokenizer and `metrics.json`. `--resume auto`
continues from the last checkpoint only when the saved settings, what they name by content, and the rows the data
became match the new ones, so a different run never picks up another run's state: not after a data file is edited
in place, a Hub dataset gets a new commit, or alignkit reads the same file into other rows.

No good run is thrown away: `prepare_run` only decides, and `start_run` claims the folder when training starts,
after the settings, the data, the model and the trainer have all been checked. An earlier run in the folder is
moved aside then (`NAME.previous-TIME`); if the new run fails before its first checkpoint, its folder is removed
and the earlier run goes back in place (after a kill, at the next command: `alignkit_claim.json`). A run that
fails later keeps its checkpoints, marked by `alignkit_failed.txt`, for `--resume auto` to continue.

Settings set back find their run: under `--resume auto`, a run moved aside whose settings, inputs and rows match
this one's (the newest such `NAME.previous-TIME` with a checkpoint) is moved back in place when the run starts,
the run there going aside in turn, and resumes from its last checkpoint (a finished run trains no further step),
rather than train the same run again. Not for LoTA (its mask is read from the folder before the run starts).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from glob import escape as glob_escape
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core import progress
from alignkit.core.args import ConfigError, field_defaults
from alignkit.core.saved_settings import config_to_dict, not_applied, with_values
from alignkit.core.errors import UserError, is_notebook, keep_interrupts
from alignkit.core.journal import free_name, write_atomic
from alignkit.core.launch import every_process, world_size
from alignkit.core.mixture import HELD_OUT
from alignkit.core.trl_tables import BESIDE_MIXTURE
# CLAIM_FILE: in a claimed run folder until training finishes, where the earlier run went, for when this one is
# killed before its first checkpoint (no `except` runs then) and the next command must put the earlier run back.
from alignkit.core.run_records import (
    CLAIM_FILE, HUB_DATASETS, LOADED_AS, LOADED_CHAIN, LOSS_ON, NOT_APPLIED_RECORD, checkpoints, hub_datasets,
    check_not_nested, loaded_as, loaded_chain,
)
from alignkit.train import cell_checks, run_locks
from alignkit.train.kept_judgments import carry_judgments
# How a run that ends badly leaves its folder: its checkpoints kept (FAILED_FILE), or the earlier run back.
from alignkit.train.run_release import (  # noqa: F401 - FAILED_FILE, _release...: importable from here too
    FAILED_FILE, _holds_work, _release, _restore_stranded)

CONFIG_FILE = "alignkit_config.json"
# Run folders whose training (start_run's block) raised in this process, with what stopped it: a notebook's next
# cell (finish) would otherwise save the half-trained model over the earlier run just put back (check_trained).
_STOPPED: dict[Path, str] = {}
# Run folders with the rows prepare_run was given, for start_run to record beside the settings: their digest
# (alignkit.core.digests.rows_digest), the rows a run trained on as alignkit read them, and their format.
_ROWS: dict[Path, dict] = {}
# alignkit_config.json: "text" (TRL's standard rows) or "conversations", the format of the rows the run trains on,
# recorded when training starts (a reward model's checkpoint-N is scored as it trained: alignkit.feedback.rewards).
DATA_ROWS = "data_rows"
# alignkit_config.json: where the held-out rows come from and how many there are (alignkit.core.mixture.HELD_OUT):
# a --dataset_test_split auto is recorded as the split it resolved to, for the card's evaluation results.
HELD_OUT_RECORD = "held_out"
# Settings that do not change what is trained: a run that differs only in these still resumes.
NOT_TRAINING = {
    "resume", "merge_adaptors", "push_to_hub", "hub_repo_id", "hub_public", "report_to", "wandb_project",
    "logging_steps", "eval_steps", "save_steps", "save_total_limit", "per_device_eval_batch_size", "output_dir",
    "run_type",  # recorded beside the settings (save_run_config); the run folder's name already holds the stage
    "prefix_sharing",  # the same log-probs either way (alignkit.train.prefix), only faster
    "num_threads",  # CPU threads change speed, not results (alignkit.modeling.identity.INERT)
    # Recorded beside the settings (save_run_config), not settings: the inputs and rows (compared by content), the
    # loader's decisions and chain, the keys not applied, the Hub's datasets, --resume true over changed settings.
    "inputs", "trained_over", DATA_ROWS, HELD_OUT_RECORD, LOADED_AS, LOADED_CHAIN, NOT_APPLIED_RECORD, HUB_DATASETS,
    "resumed_over", LOSS_ON,
}


def _slug(text: str) -> str:
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.removesuffix(".jsonl").removesuffix(".json"))[:40]


def run_dir(s, stage: str) -> Path:
    name = s.run_name or f"{stage}-{_slug(s.model_id)}-{_slug(s.dataset_id)}"
    return Path(s.output_dir) / name


def _training_view(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in NOT_TRAINING}


def prepare_run(s, stage: str, *data) -> tuple[Path, str | None]:
    """Where this run goes and where training starts: (folder, checkpoint to resume from or None). `data` are the
    datasets the run trains and evaluates on, as alignkit read them (None for no held-out set): a checkpoint
    resumes only over the same rows.

    Writes nothing but a lock in the cache folder, held until the training ends (a second run of the same folder
    is refused in one line): `start_run` claims the folder once the new run is sure to start. Under a multi-process launch
    every rank decides from its own view of the folder, then they compare: a folder that is not shared by every
    machine (one rank would resume, another start over, and the first collective would wait forever) stops all of
    them at once with one line.
    """
    progress.quiet_library_noise()
    cell_checks.check_read_under(s, data)
    folder = run_dir(s, stage)
    check_not_nested(folder, s.run_name)  # output_dir/ov inside a trained run: refused, a rerun of it aside
    _ROWS.pop(folder.resolve(), None)  # an earlier call's rows (a notebook's earlier data) are not this run's
    if data:
        from alignkit.core.data import is_text_dataset
        from alignkit.core.digests import rows_digest

        rows = {"digest": rows_digest(*data), "format": "text" if is_text_dataset(data[0]) else "conversations"}
        if len(data) > 1 and data[1] is not None and (source := getattr(data[1], HELD_OUT, None)):
            rows[HELD_OUT_RECORD] = {**source, "rows": len(data[1])}  # where the held-out rows come from: the card
        digests = every_process(rows["digest"])
        if differing := [rank for rank, other in enumerate(digests) if other != digests[0]]:
            raise UserError(f"the processes of this launch read other rows from the same data settings: rank 0 and "
                            f"rank {differing[0]} differ (a Hub dataset cached at another commit on one machine, or "
                            "a local file that is not the same everywhere). Give every machine the same data: one shared "
                            "file or folder, or the same HF_HOME cache")
        _ROWS[folder.resolve()] = rows
    if is_notebook():  # a folder this kernel prepared and never trained (a new run_name, a %cd since): let go
        for other in run_locks.held() - {folder.resolve()}:
            run_locks.release(other)
            cell_checks.forget(other)
    busy = None
    if _first_process() and not (busy := run_locks.take(folder)):  # a second run would resume or move aside a live one
        _restore_stranded(folder)
    # The others look once the main process holds the folder and has put an earlier run back; all stop if it is busy.
    if busy := every_process(busy)[0]:
        raise UserError(busy)
    found = checkpoints(folder, say=_first_process()) if folder.is_dir() else []
    resume = s.resume == "true" or (s.resume == "auto" and found and not _changed(folder, s))
    _RESTORE.pop(folder.resolve(), None)
    # Settings set back: the folder holds another run (or none) and one moved aside is this one; start_run moves it
    # back. Not over a run with these settings in place (a finished run whose checkpoints were deleted, say).
    set_back = not resume and s.resume == "auto" and not (_holds_work(folder) and not _changed(folder, s))
    if set_back and (earlier := _same_run_aside(folder, s)):
        _RESTORE[folder.resolve()], found, resume = earlier, checkpoints(earlier), True
    if s.resume == "true" and found:
        _check_below(folder, s)
        _resume_over_changes(folder, s, found[-1].name)
    checkpoint = found[-1].name if resume and found else None
    views = every_process(f"{_RESTORE[folder.resolve()].name}/{checkpoint}" if folder.resolve() in _RESTORE
                          else checkpoint)
    if differing := [rank for rank, other in enumerate(views) if other != views[0]]:
        said = [f"{view} to resume from" if view else "no checkpoint to resume from" for view in views]
        rank = differing[0]
        raise UserError(f"{folder} is not the same folder for every process of this launch: rank 0 sees {said[0]}, "
                        f"rank {rank} sees {said[rank]}. Give --output_dir a folder every machine shares.")
    if s.resume == "true" and not checkpoint:
        aside = _same_run_aside(folder, s)
        raise ConfigError(f"--resume true, but {folder} holds no checkpoint-N folder to resume from" + (
            f"; {aside} holds this run (moved aside by a run with other settings): --resume auto moves it back and "
            "resumes it" if aside else ""))
    resume_from = str(folder / checkpoint) if checkpoint else None
    cell_checks.remember(s, folder, resume_from, data)
    return folder, resume_from


_RESTORE: dict[Path, Path] = {}  # folder -> the run moved aside that this run resumes, moved back by start_run


def _same_run_aside(folder: Path, s) -> Path | None:
    """The newest run moved aside from `folder` (NAME.previous-TIME) that holds a checkpoint and was trained with
    these settings, inputs and rows: the run these settings would resume, had it stayed in place."""
    if getattr(s, "adapter", "lora") == "lota":
        return None
    rows = _ROWS.get(folder.resolve())
    for earlier in sorted(folder.parent.glob(f"{glob_escape(folder.name)}.previous-*"), reverse=True):
        if not earlier.is_dir() or not checkpoints(earlier):
            continue
        if rows is not None:  # compared as the folder's own: _changed reads the rows by folder
            _ROWS[earlier.resolve()] = rows
        try:
            if not _changed(earlier, s):
                return earlier
        finally:
            _ROWS.pop(earlier.resolve(), None)
    return None


def _first_process() -> bool:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", 0)) == 0


def _changed(folder: Path, s) -> list[str]:
    """The training settings in which `s` differs from the run saved in `folder`, the inputs they name by path
    whose content differs (the model's chain and local data retrained or edited in place), and "data rows" when
    the rows prepare_run was given differ from the rows the run trained on."""
    saved_file = folder / CONFIG_FILE
    try:
        saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {}
    except (OSError, ValueError):  # cut short or damaged: what the run was cannot be told, so it is another run
        return [f"{CONFIG_FILE} unreadable"]
    if not isinstance(saved, dict):
        return [f"{CONFIG_FILE} unreadable"]
    old, new = _training_view(saved), _training_view(config_to_dict(s))
    # A setting added since the run was saved (absent from its file) is left at its default by the run's command:
    # the same command, not other settings (rl.py's runs restarted when chat_template_kwargs became a setting).
    defaults = _defaults(type(s)) if saved else {}
    changed = [k for k in old.keys() | new.keys() if old.get(k) != new.get(k)
               and not (k not in old and k in defaults and new.get(k) == defaults[k])]
    # A TRL line's --dataset_test_split auto (the dataset's test split where it has one) was none before it existed:
    # the rows held out decide, compared below ("data rows"), not the spelling (the review of session 32).
    if old.get("dataset_test_split") is None and new.get("dataset_test_split") == "auto":
        changed = [k for k in changed if k != "dataset_test_split"]
    # Under a dataset_mixture, one dataset's split, configuration and test split are read by nothing (a recipe's,
    # saved by a run made before they went with its dataset_id): the rows decide, compared below.
    if old.get("dataset_mixture") and new.get("dataset_mixture"):
        changed = [k for k in changed if k not in BESIDE_MIXTURE]
    # One folder or file spelled two ways (runs/sft, ./runs/sft/, its absolute path) is the same input: its content
    # is compared below, under the spelling the run recorded (the data digest is keyed by it).
    respelled = {k: old[k] for k in changed if _same_place(old.get(k), new.get(k))}
    changed = [k for k in changed if k not in respelled]
    if "inputs" in saved:  # a run saved before alignkit recorded them compares by settings alone
        now = run_inputs(with_values(s, **respelled), folder)  # the run's spelling, the settings as checked
        changed += [k for k in now if k != NAMED and saved["inputs"].get(k) != now[k]]
        if isinstance(then := saved["inputs"].get(NAMED), dict):  # recorded since: other files the settings name
            changed += [f"{k} content" for k in then.keys() | now[NAMED].keys()
                        if k not in changed and then.get(k) != now[NAMED].get(k)]
    # `auto` is 4-bit on CUDA and none on a CPU: the checkpoints' adapter trained over the NF4-rounded base would go
    # on over the full-precision one (a run folder carried to another machine).
    if (then := (saved.get(LOADED_AS) or {}).get("quantization")) and then != _quantization_now(s):
        changed.append("quantization as loaded")
    return sorted(changed)


def _defaults(cls) -> dict:
    """Each setting's default, in the JSON form a saved run's settings take."""
    return json.loads(json.dumps(field_defaults(cls), default=str))


def _quantization_now(s) -> str:
    """What the loader would make of --quantization for this run (alignkit.modeling.models.load_model): auto on
    this hardware, and full precision for LoTA or a chain holding a LoTA delta."""
    from alignkit.core.launch import resolve_quantization
    from alignkit.modeling.chain import resolve

    if getattr(s, "adapter", "lora") == "lota" or resolve(s.model_id, getattr(s, "revision", None)).deltas:
        return "none"
    return resolve_quantization(s.quantization, for_training=True, log=False)


def _check_below(folder: Path, s) -> None:
    """--resume true over a part of the chain changed since the checkpoints were trained over it: refused (auto
    starts over by itself: the model's files are an input)."""
    from alignkit.modeling.chain import resolve
    from alignkit.modeling.lineage import changed_below, folders

    if found := changed_below(folder, set(folders(resolve(s.model_id, getattr(s, "revision", None))))):
        raise ConfigError(f"--resume true: {folder}'s checkpoints were trained over {found[0]}, which has changed "
                          f"since ({', '.join(found[1][:3])}): resumed, they would go on over another model. "
                          "--resume false starts over")


# What the checkpoints' weights are, or how they act: changed, they cannot be resumed (PEFT refuses the state dict,
# the adapter's scaling differs, or the optimizer's state is another model's). A LoTA run resumes its own mask.
_WEIGHTS = ("model_id", "gguf_file", "adapter", "lora_r", "lora_alpha", "use_rslora", "lora_target_modules",
            "lora_modules_to_save", "use_dora", "lota_target_modules", "lota_mask", "lota_exclude_mask", "model files",
            "lota_mask content", "lota_exclude_mask content")
_RESUMED_OVER: dict[Path, dict] = {}  # folder -> {"step", "changed": {setting: [run's, now]}}, for save_run_config


def _resume_over_changes(folder: Path, s, checkpoint: str) -> None:
    """--resume true over settings other than the run's: refused before the model loads where they change what the
    checkpoints' weights are; else named in one line and recorded (alignkit_config.json's `resumed_over`: from
    which step which settings or inputs changed), since the run's settings then hold for the later steps only. A
    record that cannot be read resumes as asked, saying so."""
    _RESUMED_OVER.pop(folder.resolve(), None)
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        logger.info(f"--resume true: {folder}'s {CONFIG_FILE} is missing or unreadable, so what changed since its "
                    "checkpoints cannot be told; resuming as asked")
        return
    if not (changed := _changed(folder, s)):
        return
    now = config_to_dict(s)
    if weights := [k for k in changed if k in _WEIGHTS]:
        if weights == ["model files"]:
            raise ConfigError(f"--resume true: the model's files changed since {folder}'s checkpoints were trained "
                              f"over them (a new Hub commit of {s.model_id}?): pass --revision with the commit the "
                              "run trained on, or --resume false to start over")
        shown = ", ".join(f"{k} {saved.get(k)!r} -> {now.get(k)!r}" if k in now else k for k in weights)
        raise ConfigError(f"--resume true: {folder}'s checkpoints hold other weights than these settings make "
                          f"({shown}). Resume with the run's own values, or --resume false to start over")
    if _first_process():
        logger.warning(f"--resume true over changed settings ({', '.join(changed)}): the steps to {checkpoint} trained "
                       f"with the run's earlier values, the later ones with these; {CONFIG_FILE} records both")
    _RESUMED_OVER[folder.resolve()] = {"step": int(checkpoint.rsplit("-", 1)[1]), "changed": {
        k: [saved.get(k), now.get(k)] for k in changed if k in now or k in saved},
        "inputs": [k for k in changed if k not in now and k not in saved]}  # data rows, quantization as loaded, ...


NAMED = "named files"  # run_inputs' record of the other files the settings name, by setting and value


def _same_place(a, b) -> bool:
    return isinstance(a, str) and isinstance(b, str) and Path(a).exists() and Path(b).exists() and \
        Path(a).resolve() == Path(b).resolve()


def run_inputs(s, folder: Path | None = None) -> dict:
    """What the settings name by path, by content: the model's whole chain (alignkit.modeling.identity), each
    local data file or folder, and the other files they name (NAMED: a chat template, a reward's code or model, a
    judge prompt, a LoTA mask; alignkit.train.named_files). A Hub model counts by its commit; a Hub dataset by its
    id and split (settings) and by its rows: the digest of the rows prepare_run was given for `folder` ("data
    rows"), which also tells a file read into other rows (another alignkit, another --dataset_format) from the rows
    a checkpoint trained on."""
    from alignkit.core.digests import digest
    from alignkit.modeling.identity import chain_identity, data_identity
    from alignkit.train.named_files import named_files

    sources = [s.dataset_id, *(entry["id"] for entry in (s.dataset_mixture or {}).get("datasets", []))]
    data = {source: found for source in sources if (found := data_identity(source)) is not None}
    model = chain_identity(s.model_id, getattr(s, "revision", None), getattr(s, "gguf_file", None))
    found = {"model files": digest(model), "data files": digest(data), NAMED: named_files(s)}
    if folder is not None and (rows := _ROWS.get(folder.resolve())):
        found["data rows"] = rows["digest"]
    return found


@contextlib.contextmanager
def start_run(s, folder: Path, resume_from: str | None, model=None, data=(), built=()):
    """Claim the run folder for the training inside the `with` block (see the module docstring): the training
    prepare_run decided, once, with the same settings, `data` and checkpoint, of a `model` built under those settings
    (and each of `built`: (thing, its cell by what it does: TrainSettings.notebook_cells) pairs, such as rl.py's
    (rewards, "rewards")) that no earlier training cell trained unless it resumes (cell_checks.check_prepared;
    refused in one line naming the notebook cells to run again).

    Under a multi-process launch the main process moves and writes; the others wait for it, then train.
    """
    with _given_back_if_refused(folder):
        cell_checks.check_prepared(s, folder, resume_from, model, data, _STOPPED.get(folder.resolve()), built)
    cell_checks.used(folder)
    if model is not None:
        model._alignkit_trained_in = folder.name  # a later training cell of this model must resume, or reload it
    if world_size() == 1:
        write, order = True, contextlib.nullcontext()
    else:
        from accelerate import PartialState

        # On a machine without CUDA, processes talk over gloo; transformers needs use_cpu for that (trl_config).
        state = PartialState(cpu=not torch.cuda.is_available())
        write, order = state.is_main_process, state.main_process_first()
    aside = None
    _STOPPED.pop(folder.resolve(), None)
    cell_checks.TRAINED.pop(folder.resolve(), None)
    with order:
        if write:
            aside = _claim(s, folder, resume_from)
    cell_checks.STARTED.add(folder.resolve())
    cell_checks.TRAINING.add(folder.resolve())  # its trainers train in this block only (check_in_training_cell)
    try:
        with keep_interrupts():  # a Ctrl-C swallowed where Python drops exceptions (a finalizer) stops it all the same
            yield
    except BaseException as error:  # Ctrl-C too: a run stopped before its first checkpoint gives the folder back
        _STOPPED[folder.resolve()] = type(error).__name__
        if write:
            _release(folder, aside, error)
        raise
    else:
        cell_checks.trained(s, folder)  # what the cell that saves it checks its settings against
    finally:
        cell_checks.TRAINING.discard(folder.resolve())
        run_locks.release(folder)  # prepare_run's hold: the next run in this folder may start


def check_training_cell(s, folder: Path) -> None:
    """A training cell refused before TRL's config is built (cell_checks.check_before_config)."""
    with _given_back_if_refused(folder):
        cell_checks.check_before_config(s, folder, _STOPPED.get(folder.resolve()))


@contextlib.contextmanager
def _given_back_if_refused(folder: Path):
    """A training cell refused (cell_checks) gives up prepare_run's hold and decision: the cells run again take them
    again."""
    try:
        yield
    except UserError:
        run_locks.release(folder)
        cell_checks.forget(folder)
        raise


def check_trained(folder: Path, s=None) -> None:
    """Refuse to save a run whose training stopped in this process (a notebook's interrupted training cell, then
    the next cell): its model is half-trained, and the folder holds the earlier run again, or the checkpoints to
    resume from. With `s`: one that did not train in this process, or trained with other settings
    (cell_checks.check_saved)."""
    if stopped := _STOPPED.get(folder.resolve()):
        again = cell_checks.cells_from(cell_checks.notebook_cells(s, folder), again=True)
        raise UserError(f"the training of {folder} stopped ({stopped}) and did not finish: nothing saved. Run {again}, "
                        "then this one: it resumes from the last checkpoint, if any")
    if s is not None:
        cell_checks.check_saved(s, folder, NOT_TRAINING)


def _claim(s, folder: Path, resume_from: str | None) -> Path | None:
    aside = None
    if earlier := _RESTORE.pop(folder.resolve(), None):
        return _move_back(s, folder, earlier, resume_from)
    if resume_from:
        logger.info(f"resuming from {resume_from}")
    elif _holds_work(folder):
        aside = free_name(folder.parent, f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        changed = _changed(folder, s)
        why = f"trained with other settings or inputs ({', '.join(changed)})" if changed else f"--resume {s.resume}"
        resumable = changed and checkpoints(folder) and not set(changed) & {*_WEIGHTS, "data rows", "data files",
                                                                              f"{CONFIG_FILE} unreadable"}
        logger.info(f"{folder} holds an earlier run ({why}): moved it to {aside}" + (
            " (--resume true would have gone on from its last checkpoint with these settings)" if resumable else ""))
    try:  # a Ctrl-C anywhere in here gives the folder back too (start_run's `except` only covers training)
        if aside:
            shutil.move(str(folder), aside)
        folder.mkdir(parents=True, exist_ok=True)
        if aside:
            write_atomic(folder / CLAIM_FILE, json.dumps({"earlier_run": str(aside)}) + "\n")
            carry_judgments(aside, folder)  # what its judge reward paid for serves this run too
        (folder / FAILED_FILE).unlink(missing_ok=True)
        save_run_config(s, folder / CONFIG_FILE)
    except BaseException as error:
        if aside and Path(aside).exists():
            _release(folder, aside, error)
        raise
    return aside


def _move_back(s, folder: Path, earlier: Path, resume_from: str) -> Path | None:
    """Settings set back: the run moved aside that they trained (prepare_run's `_same_run_aside`) goes back in place,
    and what is in the folder now goes aside (an empty folder is removed). Returns where that went."""
    aside = None
    if folder.exists() and (_holds_work(folder) or any(folder.iterdir())):
        aside = free_name(folder.parent, f"{folder.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(folder), aside)
    elif folder.exists():
        folder.rmdir()
    shutil.move(str(earlier), folder)
    if aside:
        carry_judgments(aside, folder)
    logger.info(f"{earlier} holds a run with these settings and inputs (moved aside by a run with others): moved "
                f"it back to {folder}, resuming from {Path(resume_from).name}" + (
                    f"; the run that was there is in {aside}" if aside else "") + " (--resume false trains anew)")
    for stale in (FAILED_FILE, CLAIM_FILE):  # how it ended then, and where its own earlier run went: history now
        (folder / stale).unlink(missing_ok=True)
    save_run_config(s, folder / CONFIG_FILE)
    return aside


def save_run_config(s, path: Path) -> None:
    """alignkit_config.json: the resolved settings (secrets redacted), the run type (`run_type` of the settings
    class: sft, dpo, reward, rl), so a model card states what the run was instead of guessing it, and the content
    of what the settings name by path (`run_inputs`), which `--resume auto` compares, and the local model folders
    this run trains over by content, as it loaded them, which the loader compares (alignkit.modeling.lineage), and
    the format of the rows it trains on (`data_rows`) and what the loss covered (`loss_on`: sft.py's --train_on as
    it resolved), and how the model was loaded (`loaded_as`: quantization, dtype and attention after every `auto`,
    the attention as it ran; `loaded_chain`: the base and the adapters it loaded), and which of the datasets it
    names are the Hub's (`hub_datasets`, for its card), and the keys given that alignkit does not apply
    (`not_applied`: value and why).
    The folder's README.md is alignkit's card from then on (alignkit.core.card.write_card)."""
    from alignkit.modeling.lineage import TRAINED_OVER, trained_over
    from alignkit.train.loss_mask import loss_on

    below = trained_over(s.model_id, getattr(s, "revision", None), getattr(s, "gguf_file", None), path.parent)
    data = {**config_to_dict(s), "run_type": getattr(s, "run_type", None), "inputs": run_inputs(s, path.parent),
            TRAINED_OVER: below,
            HUB_DATASETS: hub_datasets(getattr(s, "dataset_id", None), getattr(s, "dataset_mixture", None))}
    if rows := _ROWS.get(path.parent.resolve()):
        data[DATA_ROWS] = rows["format"]
        if HELD_OUT_RECORD in rows:
            data[HELD_OUT_RECORD] = rows[HELD_OUT_RECORD]
    # "auto" as the loader resolved it (4bit is QLoRA), the chain under this run, a recipe's keys not applied
    # (max_prompt_length), what the loss covered: for its card (alignkit.core.card)
    records = ((LOADED_AS, loaded_as(s.model_id)), (LOADED_CHAIN, loaded_chain(s.model_id)),
               (NOT_APPLIED_RECORD, not_applied(s)), (LOSS_ON, loss_on(s)))
    data |= {key: record for key, record in records if record}
    try:  # --resume true over changed settings, this time and before (a resumed run's file is rewritten)
        earlier = json.loads(path.read_text()).get("resumed_over", []) if path.is_file() else []
    except (OSError, ValueError, AttributeError):
        earlier = []
    resumed = _RESUMED_OVER.pop(path.parent.resolve(), None)
    if changes := [*earlier, *([resumed] if resumed else [])]:
        data["resumed_over"] = changes
    write_atomic(path, json.dumps(data, indent=2) + "\n")  # a torn file would stop the next --resume auto
    from alignkit.core.card import write_card

    write_card(path.parent, in_progress=True)  # the run in progress, until its end writes the finished run's
