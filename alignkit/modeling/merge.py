"""Merge adapters into their base model, check the merge, and save a standalone model.

Two ways to merge a QLoRA adapter (see peft#2105, qlora#254):
- default: into the base in full precision. The standard; the result is the original base plus the LoRA
  update. The adapter was trained against the NF4-rounded base, so this model differs slightly from the one
  that was trained. Never merge into the 4-bit weights themselves: re-quantizing rounds the small update away.
- `dequantize=True`: into the base rounded to the 4-bit format its run trained over (NF4 with double quantization
  unless it chose fp4 or none) and turned back into plain weights, so the merged model is exactly the one
  that was trained, rounding of the base included. Use it for a QLoRA adapter whose quality you measured
  in training and want to keep bit for bit.
- `dequantize=None` (the default): the first, but the second for a reward model trained with QLoRA. Its scores
  are the product (a judge, rl.py's `rm:`), its card quotes its held-out accuracy, and `rm:RUN` scores over the
  4-bit-rounded base (alignkit.feedback.rewards): over the full-precision base the tiny preset's merged reward
  model scored 0.68 held-out accuracy where it trained to 0.72, its rewards off by up to 1.

A chain (base -> SFT adapter -> DPO adapter) merges in order. The merge and its check run in fp32, in CPU RAM:
the merged model's logits on a few prompts are compared with the unmerged base-plus-adapters model, and a
difference above the tolerance is an error that says by how much. Only then is the model cast to `dtype`
(bf16 on a GPU machine) and saved. In bf16 the check could not tell a wrong merge from rounding: on the tiny
model the two bf16 computations already differ by 0.14-0.19 in the logits, and more on a deep 7B model.

A reward model (reward.py: a LoRA adapter of task type SEQ_CLS with its score head) merges the same way; the
trained score head replaces the base's, and the check compares the rewards instead of the logits. The merged
model loads with AutoModelForSequenceClassification.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch

from alignkit import logger
from alignkit.core import progress
from alignkit.core.config import ModelSettings, loader_settings
from alignkit.core.errors import UserError
from alignkit.core.digests import digest
from alignkit.core.journal import read_json, write_atomic

# Max |logit difference| accepted between the merged and the unmerged model, relative to the largest |logit|
# (at least 1). Both run in fp32 and merging only reorders the same arithmetic, so the bound is fp32 noise
# accumulated over the layers; a merge that loses or doubles part of an update is orders of magnitude above it.
TOLERANCE = 1e-4
CHECK_PROMPTS = ["Hello! What can you do?", "Name three fruits.", "Explain gravity to a child in one sentence."]
# Carried over so the merged folder describes itself (its model card: alignkit.core.card).
RUN_FILES = ("alignkit_config.json", "metrics.json", "alignkit_evals.json")


def _check_inputs(tokenizer, device):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template else p
        for p in CHECK_PROMPTS
    ]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = side
    return batch


def keep_checkpoint_metrics(adapter_dir, out, config: dict | None = None) -> None:
    """A checkpoint-N (or its merge), which has no metrics.json of its own, gets one: its figures at its step
    (alignkit.core.run_records.checkpoint_metrics; the run's metrics.json is the finished run's) and, for a reward
    model, its run's rows' format (`reward_rows`, from the run's data_rows), the length it trained at
    (`trained_max_length`) and how its base was loaded
    (`trained_quantization`), the record a push uploads so that a Hub copy is judged as it trained
    (alignkit.feedback.rewards). Nothing when `out` has one."""
    from alignkit.core.run_records import checkpoint_metrics, run_config, trained_four_bit, trained_quantization
    from alignkit.modeling.reward_models import REWARD, model_kind

    if (Path(out) / "metrics.json").exists():
        return
    metrics = checkpoint_metrics(adapter_dir)
    config = run_config(adapter_dir) if config is None else config
    if (rows := config.get("data_rows")) and model_kind(str(adapter_dir)) == REWARD:
        from alignkit.feedback.rewards import LENGTH_KEY, QUANTIZATION_KEY, ROWS_KEY

        metrics[ROWS_KEY] = rows
        if isinstance(config.get("max_length"), int):  # the length it trained at (longer pairs were dropped)
            metrics[LENGTH_KEY] = config["max_length"]
        if quantization := trained_quantization(adapter_dir):  # a Hub copy scores over the base it trained over
            metrics[QUANTIZATION_KEY] = quantization
            metrics |= trained_four_bit(adapter_dir) if quantization == "4bit" else {}
    if metrics:
        write_atomic(Path(out) / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def _where(part: str) -> str:
    return str(Path(part).resolve()) if Path(part).is_dir() else part


def _recorded_part(part: str) -> str:
    """How merge.json names a part of the chain: where it is, or for a checkpoint's frozen_N (its copy of an adapter
    below its run's, alignkit.modeling.chain.checkpoint_frozen) the adapter it stands for, as its run recorded
    loading it (the card named `.../frozen_0`, no model anyone trained, and read no settings of the SFT run there)."""
    from alignkit.core.run_records import is_checkpoint, recorded_chain
    from alignkit.modeling.chain import checkpoint_frozen

    path = Path(part)
    if not (path.is_dir() and path.name.startswith("frozen_") and is_checkpoint(path.parent)):
        return _where(part)
    below = (recorded_chain(path.parent) or {}).get("adapters") or []
    copies = [p.name for p in checkpoint_frozen(str(path.parent))]
    if path.name in copies and len(copies) == len(below):
        return _where(below[copies.index(path.name)])
    return _where(part)


def merge_adapters(adapter_dir, output_dir, dtype: str = "auto", base_model: str | None = None,
                   dequantize: bool | None = None, max_shard_size: str = "5GB", trust_remote_code: bool = False) -> Path:
    """Merge the adapter chain ending at `adapter_dir` into its base; returns the output folder."""
    placed: list[Path] = []  # the new merge, once it is in its place
    try:
        return _merge(adapter_dir, output_dir, dtype, base_model, dequantize, max_shard_size, trust_remote_code,
                      placed)
    except KeyboardInterrupt as error:
        _say_stopped(error, Path(output_dir), bool(placed))
        raise


def _merge(adapter_dir, output_dir, dtype: str, base_model: str | None, dequantize: bool | None,
           max_shard_size: str, trust_remote_code: bool, placed: list[Path]) -> Path:
    from alignkit.core.launch import resolve_dtype
    from alignkit.modeling.models import load_model
    from alignkit.modeling.reward_models import REWARD, model_kind

    final = Path(output_dir)
    _restore_replaced(final)
    if final.exists() and not final.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a folder: pass a folder for the merged model (a new "
                        "one, or an earlier merge's)")
    if final.exists() and (other := _not_a_merge(final)):
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UserError(f"--output_dir {output_dir} holds other things than a merged model ({shown}): the merge "
                        "replaces the folder whole; pass a new folder (or an earlier merge's)")
    if added := _added_since_the_merge(final):  # a user's notes, the evaluations of the model there: not lost
        raise UserError(f"--output_dir {output_dir} holds {', '.join(added)}, which its merge did not write, and the "
                        "merge replaces the folder whole: move them out, or pass another --output_dir")
    _check_not_in_chain(final, adapter_dir, base_model)
    from alignkit.core.run_records import run_config, trained_four_bit, trained_quantization

    config = run_config(adapter_dir)  # a checkpoint-N's: its run's
    trained_on = trained_quantization(adapter_dir)  # as loaded: `auto` on CUDA trained over 4-bit
    if dequantize and trained_on in ("none", "8bit"):  # the 4-bit-rounded base is another model than the one trained
        raise UserError(f"--dequantize merges into the base rounded to 4-bit, as QLoRA trains on it, but "
                        f"{adapter_dir} was trained with --quantization {trained_on}: drop --dequantize")
    reward = model_kind(str(adapter_dir)) == REWARD
    if dequantize is None:
        dequantize = reward and trained_on == "4bit"
        import importlib.util

        if dequantize and importlib.util.find_spec("bitsandbytes") is None:  # rounding to 4-bit needs it
            dequantize = False
            logger.warning(f"merge: {adapter_dir}'s reward model trained with QLoRA merges into the full-precision "
                           "base, since bitsandbytes is not installed (rounding the base to 4-bit needs it): its scores "
                           "will differ from the trained model's; install bitsandbytes and merge again to keep them")
        if dequantize:
            logger.info(f"merge: into the base rounded to 4-bit and dequantized, as {adapter_dir}'s reward model "
                        "trained with QLoRA (its scores and held-out accuracy are that model's); --dequantize false "
                        "merges into the full-precision base")
    target = resolve_dtype(dtype)  # what is saved; the merge itself is done and checked in fp32
    # --dequantize rounds the base to the 4-bit format its run trained over (NF4 with double quantization unless the
    # run asked for fp4 or no double quantization).
    settings = ModelSettings(model_id=str(adapter_dir), dtype="fp32", trust_remote_code=trust_remote_code,
                             attn_implementation="eager", use_liger="false", **trained_four_bit(adapter_dir))
    loaded = load_model(settings, full_precision=True, dequantize=dequantize, base_model=base_model, on_cpu=True,
                        reward=reward)
    if not loaded.adapters and not loaded.deltas:
        raise UserError(f"{adapter_dir} holds no adapter_config.json or LoTA delta: there is nothing to merge")
    model, tok = loaded.model, loaded.tokenizer
    batch = _check_inputs(tok, model.device)
    with torch.no_grad():
        if not loaded.adapters:  # LoTA deltas only: the loader already added them into the weights
            expected = lota_expected_logits(loaded, batch, settings)
            merged = model
        else:
            model.base_model.set_adapter(loaded.frozen)  # every adapter of the chain on, as in training
            expected = model(**batch).logits.float()
            merged = model.merge_and_unload(adapter_names=loaded.frozen, progressbar=progress.live())
        got = merged(**batch).logits.float()
    mask = batch["attention_mask"].bool()
    # Logits at every real token; a reward model's one score per sequence.
    diff = ((expected - got).abs() if reward else (expected - got).abs()[mask]).max().item()
    tolerance = TOLERANCE * max(1.0, (expected if reward else expected[mask]).abs().max().item())
    if not diff <= tolerance:  # also catches NaN
        raise UserError(f"merge check failed: merged {'rewards' if reward else 'logits'} differ from base + adapters "
                        f"by up to {diff:.3g} (tolerance {tolerance:.3g}, in fp32); nothing was saved. The adapter "
                        "works unmerged (every alignkit script loads it as it is); please report the model family "
                        "and the peft version")
    logger.info(f"merge check: max |logit difference| {diff:.2e} <= {tolerance:.2e} (fp32) over "
                f"{len(CHECK_PROMPTS)} prompts")
    merged.to(target)
    # Written beside the output, its card included, and put in its place whole as the last step: a kill mid-write
    # leaves the earlier merged model as it was (not new weights under its old merge.json and card), and the
    # partial folder is removed on the way out.
    out = final.parent / f".{final.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    try:
        _save(merged, tok, out, final, adapter_dir, config, loaded, settings, reward, dequantize, target, diff,
              tolerance, max_shard_size, placed)
    except BaseException:  # a Ctrl-C, a SIGTERM, a full disk: a model's size of files that nothing would use
        shutil.rmtree(out, ignore_errors=True)
        raise
    return final


def _say_stopped(error: KeyboardInterrupt, final: Path, placed: bool) -> None:
    """A merge never resumes: an interrupt's line says what is there (the new merge if it was already in its place,
    else what the folder held, as it was) and that the same command merges again from the start, instead of the
    scripts' generic "goes on from there"."""
    from alignkit.core.errors import Terminated, run_again, said_how_to_go_on

    ended = "was stopped (SIGTERM)" if isinstance(error, Terminated) else "was interrupted"
    old = _replaced(final)
    if placed:  # only the earlier merge's removal was cut short
        left = f"; the earlier merge left in {old} is removed by the next merge into it" if old.exists() else ""
        logger.info(f"the merge {ended} after it finished: the new merge is in {final}, whole, with its card{left}")
        said_how_to_go_on()
        return
    if _a_merged_model(final) and (final / "merge.json").is_file():
        kept = f"the earlier merge in {final} is kept as it was"
    elif final.is_dir():
        kept = f"{final} is as it was{' (empty)' if not any(final.iterdir()) else ''}"
    elif old.is_dir():  # the swap could not put it back (an error of the disk): the next merge does
        kept = f"the earlier merge is in {old}, which the next merge puts back in {final}"
    else:
        kept = f"{final} was not written"
    logger.info(f"the merge {ended}, and a merge does not resume: nothing of it is kept (its partial folder is "
                f"removed); {kept}; {run_again()} to merge again")
    said_how_to_go_on()


def _save(merged, tok, out: Path, final: Path, adapter_dir, config, loaded, settings, reward: bool, dequantize,
          target, diff: float, tolerance: float, max_shard_size: str, placed: list[Path]) -> None:
    """The merged model, its tokenizer, records and card into `out`, which then replaces `final` whole."""
    from alignkit.core.card import model_card
    from alignkit.core.launch import FourBit

    merged.save_pretrained(out, max_shard_size=max_shard_size)
    tok.save_pretrained(out)  # with its chat template
    # Generation stops at the tokenizer's eos (the chat template's end of turn) and pads with its own token.
    if not reward:  # a reward model does not generate, and has no generation config
        merged.generation_config.pad_token_id = tok.pad_token_id
        merged.generation_config.eos_token_id = tok.eos_token_id
        merged.generation_config.save_pretrained(out)
    for name in RUN_FILES:
        if Path(adapter_dir, name).is_file():
            shutil.copy(Path(adapter_dir, name), out / name)
    # A checkpoint-N holds no run records of its own: its run's settings (the run type, the rows' format for a
    # reward model) are its own too. The run's metrics and evaluations are the finished run's, not the checkpoint's:
    # its metrics.json holds its own figures at its step (and a reward model's rows format, which a push uploads).
    if config and not (out / RUN_FILES[0]).exists():
        write_atomic(out / RUN_FILES[0], json.dumps(config, indent=2) + "\n")
    keep_checkpoint_metrics(adapter_dir, out, config)
    written = sorted({p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} | {"merge.json", "README.md"})
    (out / "merge.json").write_text(json.dumps({
        "base_model": loaded.base_id, "base_revision": loaded.base_revision,
        # A local part by where it is (given relative to another folder, it named nothing from the next one); a
        # checkpoint's frozen_N copy by the adapter it stands for.
        "adapters": [_recorded_part(part) for part in loaded.adapters],
        "lota_deltas": [_where(part) for part in loaded.deltas],
        "dequantize": dequantize, **({"dequantized_from": str(FourBit.of(settings))} if dequantize else {}), "dtype": str(target).removeprefix("torch."), "check_dtype": "float32",
        "max_logit_difference": diff, "tolerance": tolerance,
        "kind": "reward model" if reward else "causal language model",
        # What the next merge into this folder may replace: these files, the evaluations as they were copied.
        "files": written, "evaluations": _evaluations(out),
    }, indent=2))
    # Its card (what it was merged from, the run's settings and evaluations), as every adapter folder has one; named
    # after the folder it goes to.
    write_atomic(out / "README.md", model_card(out, at=final))
    _put_in_place(out, final, placed)


# What save_pretrained writes for a model and its tokenizer: weights, configs, chat templates, vocabularies
# (SentencePiece .model, tiktoken, BPE .txt/.vocab), a trust_remote_code model's .py files, and the card.
MERGE_SUFFIXES = {".json", ".safetensors", ".jinja", ".md", ".txt", ".model", ".bin", ".tiktoken", ".vocab", ".py"}


def _a_merged_model(folder: Path) -> bool:
    """An empty folder, or what a merge leaves: its merge.json beside model, tokenizer and record files
    (MERGE_SUFFIXES), no subfolder but a tokenizer's additional_chat_templates/, and no adapter or delta
    (`--output_dir` naming an adapter folder replaced it with its own merge). Anything else (a runs/ folder, the
    project's root, a base model that no merge wrote, a folder of data or notes: a merge cut short leaves its files
    beside the output, never in it) is not replaced."""
    return folder.is_dir() and not _not_a_merge(folder)


def _not_a_merge(folder: Path) -> list[str]:
    """What in a folder (a file's name, a subfolder's with a /) makes it no merged model (_a_merged_model): all it
    holds where it has no merge.json, else what a merge does not write. The refusal names them."""
    from alignkit.modeling.identity import READ_SUBFOLDERS

    files = [p for p in folder.iterdir() if p.name not in READ_SUBFOLDERS or not p.is_dir()]
    files += [p for sub in READ_SUBFOLDERS if (folder / sub).is_dir() for p in (folder / sub).iterdir()]
    if (folder / "merge.json").is_file():
        files = [p for p in files if not p.is_file() or p.suffix not in MERGE_SUFFIXES
                 or p.name in ("adapter_config.json", "lota_config.json")]
    return sorted(p.relative_to(folder).as_posix() + ("/" if p.is_dir() else "") for p in files)


def _evaluations(folder: Path) -> str | None:
    """The digest of a folder's recorded evaluations (EVALS_FILE), None where it has none."""
    from alignkit.core.card import EVALS_FILE

    return digest((folder / EVALS_FILE).read_text()) if (folder / EVALS_FILE).is_file() else None


def _added_since_the_merge(folder: Path) -> list[str]:
    """What a merged folder holds that its merge did not write (merge.json's `files`): a user's notes, and the
    evaluations evaluate.py recorded for the model there since. Nothing for a merge that recorded no list."""
    from alignkit.core.card import EVALS_FILE

    record = read_json(folder / "merge.json") if folder.is_dir() else {}
    if not isinstance(record.get("files"), list):
        return []
    added = sorted(name for name in (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
                   if name not in record["files"] and name != EVALS_FILE)
    if _evaluations(folder) not in (None, record.get("evaluations")):
        added.append(f"{EVALS_FILE} (evaluations recorded since the merge)")
    return added


def _check_not_in_chain(final: Path, adapter_dir, base_model: str | None) -> None:
    """`--output_dir` must not be a model the merge reads: an earlier merge that became the base of this chain was
    replaced by its own adapter's merge, and the adapter left over a base it never trained on."""
    from alignkit.modeling.chain import resolve

    try:
        chain = resolve(str(adapter_dir), None, base_model)
    except (UserError, OSError, ValueError):  # the loader says what is wrong with the chain, in its own words
        return
    for part in (base_model or chain.base, *chain.deltas, *chain.adapters):
        if Path(part).exists() and Path(part).resolve() == final.resolve():
            raise UserError(f"--output_dir {final} is {'the base' if part == (base_model or chain.base) else 'a part'}"
                            f" of the model being merged ({adapter_dir} sits on it): the merge would replace it; "
                            "pass another --output_dir")


def _replaced(final: Path) -> Path:
    """Where an earlier merge waits while the new one takes its place (_put_in_place)."""
    return final.parent / f".{final.name}.replaced"


def _restore_replaced(final: Path) -> None:
    """An earlier merge that a merge killed hard (SIGKILL) inside its swap left beside its place goes back there, and
    is replaced (or kept) as any earlier merge is; it was deleted as a leftover."""
    old = _replaced(final)
    if old.is_dir() and not final.exists():
        old.rename(final)
        logger.warning(f"merge: {final} was missing and {old} held the merge that was there, left by a merge stopped "
                       "as it put its own in place: put back")


def _put_in_place(new: Path, final: Path, placed: list[Path]) -> None:
    """`new` becomes `final`; an earlier `final` is removed only once the new one is in its place. Ctrl-C and SIGTERM
    wait for the two renames (and the earlier one's return, if the second failed), so that `final` is always whole:
    one landing between them skipped the return, and the next merge deleted the earlier merge for good."""
    old = _replaced(final)
    _restore_replaced(final)
    shutil.rmtree(old, ignore_errors=True)
    with _interrupts_held():
        try:
            if final.exists():
                final.rename(old)
            new.rename(final)
        except BaseException:  # the earlier one goes back in its place
            if old.exists() and not final.exists():
                old.rename(final)
            raise
    placed.append(final)
    shutil.rmtree(old, ignore_errors=True)  # cut short, the next merge's rmtree above ends it


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C and SIGTERM wait until the block is done, then are delivered to the handlers that were there (main
    thread only; elsewhere no signal arrives)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None}  # None: not Python's
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(came):
            signal.raise_signal(sig)


def lota_expected_logits(loaded, batch, settings):
    """Logits of the base with the LoTA deltas unmerged: each targeted weight computed as W + D in the forward pass
    (alignkit.modeling.lota_delta.SparseDelta), the independent route the merged weights are checked against."""
    from torch.nn.utils import parametrize

    from alignkit.modeling.models import load_model
    from alignkit.modeling import lota_delta

    base = load_model(loader_settings(settings, loaded.base_id, revision=loaded.base_revision), full_precision=True).model
    for folder in loaded.deltas:  # stacked parametrizations: W + D_1 + D_2 ... in every forward pass
        delta, shapes = lota_delta.read_delta(folder)
        modules = lota_delta.target_modules(base, [n.rsplit(".", 1)[-1] for n in shapes])
        for name, (indices, values) in delta.items():
            part = lota_delta.SparseDelta(modules[name].weight, indices)
            part.lota_values.data.copy_(values)
            parametrize.register_parametrization(modules[name], "weight", part, unsafe=True)
    return base(**batch.to(base.device)).logits.float()
