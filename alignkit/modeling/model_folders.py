"""What a model source is before anything loads it: a local folder that holds a whole model, adapter or LoTA delta
(its weights there, its safetensors files whole, a training in it finished), a .gguf file, or a Hub id that the Hub
or, offline, the Hugging Face cache has. Each failure is one line naming the fix, checked before the libraries fail
on it with a traceback (or retry an unreachable Hub for a minute).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alignkit.core.errors import UserError
from alignkit.core.sources import hub_gguf, hub_offline
from alignkit.modeling.chain import _looks_local


def check_model_source(source: str, cache: bool = True, revision: str | None = None, flag: str | None = None) -> None:
    """Fail early and in one line when a model is neither a local folder nor to be had from the Hub.

    cache: offline (HF_HUB_OFFLINE=1), also require a copy of `revision` in the Hugging Face cache.
    flag: the setting that names `source` (`--adapter_dir`): a refusal that names another folder to use says it so.
    """
    from alignkit.core.hub import require_reachable

    if Path(source).is_dir():
        _check_model_folder(Path(source), flag)
    elif Path(source).is_file() and not source.lower().endswith(".gguf"):  # adapter_config.json, a data file, ...
        raise UserError(f"{source} is a file, not a model: pass the folder that holds it ({Path(source).parent}), a "
                        ".gguf file, or a Hub id")
    if Path(source).exists() or hub_gguf(source):  # a Hub GGUF file checks itself as it downloads (gguf.locate)
        return
    above = _found_above(source)  # "found at ../runs/tiny-dpo: ..." for each refusal below
    if _looks_local(source):
        raise _not_found(source, above, ", and not a Hub id", "check the path")
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:  # a typo such as runs/tiny--sft or a folder@REV: huggingface_hub's traceback, after the work before it
        validate_repo_id(source)
    except HFValidationError as e:
        raise _not_found(source, above, f", and not a Hub id ({str(e).rstrip('.')})", "check the path") from None

    if cache and constants.HF_HUB_OFFLINE and not any(
        isinstance(try_to_load_from_cache(source, name, revision=revision), str)
        for name in ("config.json", "adapter_config.json")
    ):
        at = f" at revision {revision}" if revision else ""
        if _names_local_folder(source, above):  # runs/tiny-dpo from a notebook's folder: no Hub id to download
            raise _not_found(source, above, f", nor a Hub id the Hugging Face cache holds{at}")
        raise UserError(f"model not found: {source} is no local folder, and HF_HUB_OFFLINE=1 while the Hugging Face "
                        f"cache holds no copy of it{at}; check the path, or unset HF_HUB_OFFLINE to download it")
    try:
        require_reachable(source)
    except UserError:  # the Hub silent: runs/tiny-sft from a notebook's folder is a path, not a download to fix
        if not _names_local_folder(source, above):
            raise
        raise _not_found(source, above) from None
    if not hub_offline() and _hub_lacks(source):
        # transformers' OSError otherwise, a 50-line traceback when the model loads (a notebook's runs/tiny-sft from
        # notebooks/, where the runs are one folder up): one line now, naming where the path was looked for.
        if _names_local_folder(source, above):
            raise _not_found(source, above, ", nor a model on the Hub")
        raise UserError(f"model not found: {source} is no local folder, and the Hub has no model of that name (a "
                        "private or gated one needs your token: `hf auth login`, or HF_TOKEN); check the name")


def _not_found(source: str, above: str | None, why: str = "", fix: str = "check the path (a run: train it first)"):
    """check_model_source's refusal of a path that is not there: where it was looked for, `why` it is no model
    either, and the folder found above the working folder (`above`) or else `fix`."""
    return UserError(f"model not found: {source} is no local folder{_looked_in(source)}{why}; {above or fix}")


_HUB_HAS: set[tuple[str, str]] = set()  # (endpoint, model) the Hub was asked about and did not answer "no such model"


def _hub_lacks(source: str) -> bool:
    """True where the Hub answers that it has no model `source` (nor one hidden from this token: private or gated
    ones it says exist count as there); False where it has one, or the question failed (the load says why then).
    Asked once a process for a model it did not refuse: preflight and the load each check the model, so a Hub slow
    to answer cost its timeout twice (and once more for each evaluated model's base). A refusal is asked again: a
    notebook's user may push the model, then run the cell again."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from alignkit.core.sources import PROBE_TIMEOUT, hub_endpoint

    key = (hub_endpoint(), source)
    if key in _HUB_HAS:
        return False
    try:
        HfApi(endpoint=key[0]).model_info(source, timeout=PROBE_TIMEOUT * 2)
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: there, behind an access request
        pass
    except RepositoryNotFoundError:
        return True
    except Exception:  # noqa: BLE001 - a timeout, a 5xx, a proxy: not a sign that the model is missing
        pass
    _HUB_HAS.add(key)
    return False


def _looked_in(source: str) -> str:
    """Where a relative path was looked for: the working folder, which in a notebook is the notebook's own folder
    (notebooks/), not the project's root where the runs usually are."""
    if Path(source).expanduser().is_absolute():
        return ""
    return f" (relative to the working folder {Path.cwd()}: in a notebook, the notebook's folder)"


def _found_above(source: str) -> str | None:
    """"found at ../runs/tiny-dpo: pass that path" where a folder above the working folder holds the relative path."""
    if Path(source).expanduser().is_absolute():
        return None
    for up in list(Path.cwd().parents)[:3]:
        if (up / source).exists():
            return f"found at {os.path.relpath(up / source)}: pass that path"
    return None


def _names_local_folder(source: str, above: str | None) -> bool:
    """An `owner/name` that names a local folder rather than a Hub model: alignkit's runs/ folder, a folder of its
    first part here (runs/ there, runs/tiny-dpo not), or the path found above the working folder (`above`, what
    _found_above said of it)."""
    first = source.split("/")[0]
    return first == "runs" or Path(first).is_dir() or above is not None


def check_model_sources(s, sources) -> None:
    """Each model an evaluation will load is there, checked as its load will check it (check_model_source, on the
    model and on the base its chain ends at), before the first one runs: a missing path or, offline, an uncached Hub
    id was found only when its turn came, after the models before it had answered everything. `sources` as
    --models gives them (ID@REVISION included); GGUF sources check themselves at their conversion."""
    from alignkit.core.sources import split_revision
    from alignkit.modeling.chain import resolve

    for source in filter(None, sources):
        model, named = split_revision(source)
        own = source == getattr(s, "model_id", None)  # --revision and --gguf_file are --model_id's (loader_settings)
        revision = named or (getattr(s, "revision", None) if own else None)
        if model.lower().endswith(".gguf") or own and getattr(s, "gguf_file", None):
            continue
        check_model_source(model, revision=revision, flag="--model_id" if own else None)
        if Path(model).is_dir():
            chain = resolve(model, revision)
            if not str(chain.base).lower().endswith(".gguf"):
                check_model_source(chain.base, revision=chain.revision)


def check_run_finished(folder, flag: str | None = None) -> None:
    """A run folder whose training has not finished (it holds no weights of its own yet: it is training, or it
    stopped), or a checkpoint of it cut off while it was saved: one line saying so, naming the run's latest complete
    checkpoint to use instead (`flag`: the setting to pass it with); nothing for any other folder."""
    from alignkit.core.run_records import RUN_CONFIG, checkpoints, earlier_run_aside

    folder = Path(folder)
    _check_checkpoint_whole(folder, flag)
    if _holds_model(folder):
        return
    point = f"Pass {flag}" if flag else "Point at"
    if earlier := earlier_run_aside(folder):  # a training that has not finished: running, killed or failed
        if steps := checkpoints(folder):
            raise UserError(f"{folder} holds no finished model: its training has not finished (it is running, "
                            f"or it stopped or was killed after {steps[-1].name}). Point at {steps[-1]} "
                            f"(a model too), or at the earlier run in {earlier}, or run that training command "
                            "again to go on")
        raise UserError(f"{folder} holds no model now: a training run in it has saved no checkpoint yet (it is "
                        f"running, or it was killed), and the earlier run in it is in {earlier} meanwhile. Point "
                        f"at {earlier}, or run that training command again (it puts the earlier run back "
                        "first, or goes on)")
    if (folder / RUN_CONFIG).is_file() or _checkpoint_folders(folder):  # a run's folder, its weights not saved
        if steps := checkpoints(folder):
            raise UserError(f"{folder} holds no finished model: its training has not finished (it is running, "
                            f"or it stopped or was killed after {steps[-1].name}). {point} {steps[-1]}, its latest "
                            "complete checkpoint (a model too: the run at that step), or run that training command "
                            "again to resume it and finish")
        raise UserError(f"{folder} holds no model yet: its training has not finished and has saved no complete "
                        "checkpoint (it is running, or it stopped or was killed before its first one). Let it "
                        "reach a checkpoint-N and point at that, or run that training command again")


def _holds_model(folder: Path) -> bool:
    """A model's, an adapter's or a LoTA delta's config, or GGUF files (--gguf_file may name a subfolder's)."""
    markers = ("config.json", "adapter_config.json", "lota_config.json")
    return any((folder / name).is_file() for name in markers) or any(folder.glob("*.gguf")) or \
        any(folder.glob("*/*.gguf"))


def _check_model_folder(folder: Path, flag: str | None = None) -> None:
    """A local folder must hold a model (config.json), an adapter or LoTA delta, or GGUF files, and its safetensors
    files must be whole: checked in one line here, before a library fails on it with a traceback. Reading a
    safetensors header maps the file and checks that it covers every tensor, without reading the weights. A run
    folder whose training has not finished, or a checkpoint of it cut off while it was saved, is said to be one
    (check_run_finished)."""
    from safetensors import safe_open

    check_run_finished(folder, flag)
    if not _holds_model(folder):
        raise UserError(f"{folder} is not a model folder: it holds no config.json (nor adapter_config.json or a "
                        ".gguf file); point at the folder a model or adapter was saved to, or at a Hub id")
    gguf = any(folder.glob("*.gguf")) or any(folder.glob("*/*.gguf"))
    _check_weights_there(folder, gguf)
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError (and OSError for unreadable files)
            raise UserError(f"{path} is damaged ({str(e).splitlines()[0] if str(e) else type(e).__name__}): a download "
                            "or copy was cut short? Copy or download it again") from None


def _checkpoint_folders(folder: Path) -> list[Path]:
    from alignkit.core.run_records import is_checkpoint

    return [p for p in folder.glob("checkpoint-*") if p.is_dir() and is_checkpoint(p)]


def _check_checkpoint_whole(folder: Path, flag: str | None) -> None:
    """A run's checkpoint-N cut off while it was saved (a run killed then: no trainer_state.json, which transformers
    writes last, or weights cut short) is refused as a resume skips it, naming the run's latest complete one; not a
    checkpoint-N copied out of its run (no run settings beside it), which is read as any folder."""
    from alignkit.core.run_records import RUN_CONFIG, checkpoints, incomplete_checkpoint, is_checkpoint

    if not is_checkpoint(folder):
        return
    if not (folder.parent / RUN_CONFIG).is_file() or not (why := incomplete_checkpoint(folder)):
        return
    if steps := checkpoints(folder.parent):
        raise UserError(f"{why}: {'pass ' + flag if flag else 'point at'} {steps[-1]} instead, its run's latest "
                        "complete checkpoint (as a resume of the run skips this one)")
    raise UserError(f"{why}: its run {folder.parent} has no complete checkpoint; run that training command again")


def _check_weights_there(folder: Path, gguf: bool) -> None:
    """A model's or an adapter's config without its weights (a copy or download that left them out): one line, not
    transformers' OSError or PEFT's "Repo id must be in the form ..." for a local path."""
    names = {p.name for p in folder.iterdir()}
    if (folder / "adapter_config.json").is_file():
        try:
            json.loads((folder / "adapter_config.json").read_text())
        except (OSError, ValueError):
            return  # a torn config: the chain's reader names it
        if not names & {"adapter_model.safetensors", "adapter_model.bin"}:
            raise UserError(f"{folder} holds adapter_config.json but not the adapter's weights "
                            "(adapter_model.safetensors): a copy or download that left them out? Copy them too, or "
                            "point at the folder that holds them")
    elif (folder / "config.json").is_file() and not gguf and not (folder / "lota_config.json").is_file():
        weights = [n for n in names if n.endswith((".safetensors", ".bin", ".index.json", ".h5", ".msgpack", ".pt",
                                                     ".pth", ".ckpt"))]
        if not weights and not any(folder.rglob("*.gguf")):  # --gguf_file may name a file deeper down
            raise UserError(f"{folder} holds a model's config.json but no weights (model.safetensors, or "
                            "pytorch_model.bin): a copy or download that left them out, or a checkpoint saved "
                            "without them? Copy them too, or point at the folder that holds them")
