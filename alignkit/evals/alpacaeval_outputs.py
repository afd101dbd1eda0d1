"""AlpacaEval's inputs and the outputs it scores, for `evaluate.py alpaca_eval` (alignkit.evals.alpacaeval).

The eval set (AlpacaEval's 805 instructions from the Hub file, or `--eval_set`), reference outputs from a file in
AlpacaEval's format, and each model's outputs: generated with alignkit's own backends
(alignkit.modeling.generation.load_generator) and appended to `model_outputs/<name>.jsonl` batch by batch, each
record stamped with its source, its sampling and the model as loaded (`outputs_key`, its parts beside it), so a
rerun generates only what is missing and never scores another model's old outputs as this one's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.core.digests import changed_settings, decisive_sampling, sample_seed
from alignkit.core.journal import append_jsonl, write_json
from alignkit.core.progress import Progress
from alignkit.core.groups import loader_settings
from alignkit.evals.named_models import NAME, copied_from, same_source

HUB_REPO = "tatsu-lab/alpaca_eval"
EVAL_FILE = "alpaca_eval_gpt4_baseline.json"  # the 805 instructions with AlpacaEval 2's reference outputs
OUTPUT_KEYS = ("instruction", "output", "generator", "dataset")


def hub_file(filename: str, how: str) -> Path:
    """A file of the Hub dataset tatsu-lab/alpaca_eval (the eval set; df_gamed.csv for alignkit.evals.alpacaeval_report):
    from the Hub cache, or downloaded once into it."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HUB_REPO, filename, repo_type="dataset"))
    except Exception as e:  # offline, no network, gated: all the same to the user
        raise ConfigError(f"{filename} of the Hub dataset {HUB_REPO} is not in the Hub cache and could not be "
                          f"downloaded ({type(e).__name__}). Fetch it once with network (hf download {HUB_REPO} "
                          f"{filename} --repo-type dataset), or {how}") from None


# ---------------------------------------------------------------------------------------------------------
# The eval set and output files


def check_file(path, flag: str) -> None:
    """A file a flag names is there: checked before the judge's key too, so a user meets the first error they can
    fix (a run without the key said so, and only once it was set that --eval_set named no file)."""
    if not Path(path).is_file():
        raise ConfigError(f"{flag} {path} not found; check the path")


def read_rows(path, flag: str) -> list[tuple[str, dict]]:
    """(where, row) of a JSON list or JSONL file; a bad file or row is an error naming the file and row.

    UTF-8 text, a byte order mark dropped, as the training data loader reads it (alignkit.core.data_files, whose
    error for bytes that are not UTF-8 names the line and the fix)."""
    from alignkit.core.data_files import decode_text
    from alignkit.core.journal import read_jsonl

    path = Path(path)
    check_file(path, flag)
    text = decode_text(path.read_bytes(), path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); {flag} takes a JSON list of "
                              "objects or JSONL") from None
        if not isinstance(data, list):
            raise ConfigError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        rows = [(f"{path}, row {i}", row) for i, row in enumerate(data, 1)]
    else:
        rows = [(f"{path}, line {i}", row) for i, row in read_jsonl(path, f"{flag} takes JSONL or a JSON list")]
    for where, row in rows:
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return rows


def _text(where, row, field, fix) -> str:
    value = row.get(field)
    if field not in row:  # a misspelt key: named, with the row's own (a prompts file's rows say it alike)
        from alignkit.core.row_checks import no_field

        raise ConfigError(f"{where}: {no_field(row, field)}; {fix}")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: field {field!r} must be a non-empty string, got {value!r:.80}; {fix}")
    return value


def load_eval_set(eval_set: str | None, max_instances: int | None) -> tuple[list[dict], list[dict] | None]:
    """(rows {instruction, dataset}, AlpacaEval 2's reference outputs for them when the set is AlpacaEval's)."""
    hub = eval_set is None
    path = hub_file(EVAL_FILE, "pass your own --eval_set FILE (and --reference_outputs FILE or --reference_model)") \
        if hub else Path(eval_set)
    fix = "each row needs an `instruction`"
    rows, seen = [], {}
    for where, row in read_rows(path, "--eval_set"):
        instruction = _text(where, row, "instruction", fix)
        if instruction in seen:  # alpaca_eval pairs outputs by instruction: a repeat would pair the wrong ones
            raise ConfigError(f"{where}: the instruction repeats {seen[instruction]}; keep one of them")
        seen[instruction] = where
        dataset = row.get("dataset") if isinstance(row.get("dataset"), str) else path.stem
        rows.append({**row, "instruction": instruction, "dataset": dataset})
    if not rows:
        raise ConfigError(f"{path} holds no instructions; {fix}")
    if max_instances:  # alpaca_eval's own subset (main.evaluate): the rows shuffled with seed 123, then the first N
        import pandas as pd

        rows = [rows[i] for i in pd.RangeIndex(len(rows)).to_series().sample(frac=1, random_state=123)[:max_instances]]
    references = [{k: r[k] for k in OUTPUT_KEYS} for r in rows] if hub else None
    return [{"instruction": r["instruction"], "dataset": r["dataset"]} for r in rows], references


def load_reference_outputs(path, rows: list[dict], name: str | None) -> list[dict]:
    """The reference output of every eval-set instruction from a file in AlpacaEval's format."""
    fix = "rows need `instruction` and `output` (AlpacaEval's format)"
    found = {}
    for where, row in read_rows(path, "--reference_outputs"):
        instruction = _text(where, row, "instruction", fix)
        output = row.get("output")
        if not isinstance(output, str):
            raise ConfigError(f"{where}: field 'output' must be a string, got {output!r:.80}; {fix}")
        generator = name or (row["generator"] if isinstance(row.get("generator"), str) else Path(path).stem)
        found[instruction] = {"instruction": instruction, "output": output, "generator": generator}
    missing = [r["instruction"] for r in rows if r["instruction"] not in found]
    if missing:
        raise ConfigError(f"--reference_outputs {path} has no output for {len(missing)} of the eval set's "
                          f"{len(rows)} instructions, e.g. {missing[0]!r:.100}; add them, or evaluate on the set the "
                          "file answers (--eval_set)")
    return [{**found[r["instruction"]], "dataset": r["dataset"]} for r in rows]


def default_name(source: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(source.rstrip("/")).name).lstrip("._-")
    return name or "model"


def check_name(name: str, flag: str) -> str:
    if not NAME.match(name):
        raise ConfigError(f"{flag} {name!r}: use letters, digits, '.', '_' or '-' (it names files)")
    return name


def outputs_path(output_dir, name: str) -> Path:
    return Path(output_dir) / "model_outputs" / f"{name}.jsonl"


def _generation(s) -> dict:
    """The sampling an output records, as given (compared as decoding reads it: decisive_sampling)."""
    return {k: getattr(s, k) for k in ("temperature", "top_p", "num_beams", "max_new_tokens", "seed")}


def outputs_key(s, source: str, backend: str) -> str:
    """The model that makes `source`'s outputs, as loaded (alignkit.modeling.identity: every loader setting, every
    file down its adapter chain, the GGUF file, the backend, the hardware). Stamped on each output record."""
    return outputs_identity(s, source, backend)[0]


def outputs_identity(s, source: str, backend: str) -> tuple[str, dict]:
    """(outputs_key, its parts each by a digest: alignkit.modeling.identity.identity_parts), the chain resolved once.
    The parts are stamped beside the key, as MT-Bench answers record theirs: a refusal names what changed, and a
    copied or moved model is told by its content, not its path."""
    from alignkit.modeling.chain import resolve
    from alignkit.modeling.identity import identity_key, identity_parts, model_identity

    loader = loader_settings(s, source)
    resolved = resolve(loader.model_id, loader.revision)  # once, for both (a Hub adapter's is a request)
    loaded = model_identity(loader, backend, resolved)
    return identity_key(loader, backend, loaded), identity_parts(loader, loaded, resolved)


def _said(value) -> str:
    return "none" if value is None else str(value)


def read_outputs(path, source: str, generation: dict, identity: str | None = None,
                 parts: dict | None = None) -> dict[str, dict]:
    """{instruction: record} of an outputs log; records from another model, another model as loaded (`identity`,
    see outputs_key) or other sampling are an error: the old outputs are never scored as the new model's. By
    content first: outputs of the same model as loaded are taken from any path (a copy of runs/), and a model whose
    files changed is refused naming what changed (`parts`, outputs_identity's), at its path or at a copy's."""
    from alignkit.core.journal import read_jsonl
    from alignkit.modeling.identity import changed_parts

    fix = "delete the file (or the line) to generate again"
    out = {}
    for line, row in read_jsonl(path, fix, repair_tail=True):
        where = f"{path}, line {line}"
        _text(where, row, "instruction", fix)
        if not isinstance(row.get("output"), str):
            raise ConfigError(f"{where}: field 'output' must be a string; {fix}")
        same_model = identity is not None and row.get("identity") == identity  # by content, however the path reads
        if row.get("source") is not None and not same_model and same_source(row["source"]) != same_source(source) \
                and not copied_from(row["source"], source, row.get("parts"), parts):
            raise ConfigError(f"{path} holds outputs by {row['source']}, not {source}: give this model another "
                              "--model_name / --reference_name, use another --output_dir, or delete the file")
        # Compared as decoding reads it: a greedy output recorded with its --seed is the one another seed makes.
        recorded = row.get("generation")
        if recorded is not None and not (isinstance(recorded, dict) and
                                         decisive_sampling(recorded) == decisive_sampling(generation)):
            then = recorded if isinstance(recorded, dict) else {}
            keys = changed_settings(then, generation)
            changed = "; ".join(f"--{k} {_said(then.get(k, 'unrecorded'))} then, {_said(generation[k])} now"
                                for k in keys) if then else f"{recorded!r} then"
            raise ConfigError(f"{where}: generated under other sampling ({changed}): use another --output_dir, or "
                              "delete the file to generate again with the new settings")
        if identity is not None and row.get("identity") != identity:
            why = changed_parts(row.get("parts"), parts) or (
                "its files, down its adapter chain, or its loading: dtype, quantization, chat template, GGUF file, "
                "backend, hardware, library versions such as transformers'")  # recorded before parts were
            raise ConfigError(f"{where}: generated by another model as loaded than {source} now ({why}): use another "
                              "--output_dir, or delete the file to generate again")
        out[row["instruction"]] = row
    return out


def generate_outputs(generator, rows: list[dict], name: str, source: str, path, s, identity: str | None = None,
                     parts: dict | None = None) -> int:
    """Generate the outputs `path` lacks, batch by batch, appending each batch's records as it finishes."""
    path = Path(path)
    generation = _generation(s)
    todo = [r for r in rows if r["instruction"] not in read_outputs(path, source, generation, identity, parts)]
    path.parent.mkdir(parents=True, exist_ok=True)
    # A bar left open by an interrupt broke every later bar in a notebook's kernel: closed however this ends.
    with Progress(f"{name}: generating", len(todo), unit="output", errors=False) as progress:
        for start in range(0, len(todo), s.batch_size):
            batch = todo[start : start + s.batch_size]
            outs = generator([[{"role": "user", "content": r["instruction"]}] for r in batch],
                             max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                             num_beams=s.num_beams, batch_size=len(batch),
                             seeds=[sample_seed(s.seed, row["instruction"]) for row in batch])  # the same in any batch
            append_jsonl(path, [{"instruction": row["instruction"], "output": out, "generator": name,
                                 "dataset": row["dataset"], "source": source, "generation": generation,
                                 "identity": identity, "parts": parts}
                                for row, out in zip(batch, outs, strict=True)])
            progress.update(len(batch))
    return len(todo)


def outputs_done(source: str, name: str, s, backend: str) -> tuple[tuple[str, dict], dict[str, dict]]:
    """(`source`'s identity as loaded and its parts (outputs_identity), {instruction: record} of the outputs its log
    holds from that model)."""
    identity = outputs_identity(s, source, backend)
    return identity, read_outputs(outputs_path(s.output_dir, name), source, _generation(s), *identity)


def model_outputs(source: str, name: str, rows: list[dict], s, backend: str,
                  done: tuple[str, dict] | None = None) -> list[dict]:
    """The outputs of model `source` on `rows` in AlpacaEval's format, generated where missing. `done`: what
    outputs_done said of it, if asked already."""
    from alignkit.modeling.generation import load_generator

    path = outputs_path(s.output_dir, name)
    generation = _generation(s)
    if getattr(s, "preset", None) == "tiny" and not Path(source).exists():
        raise ConfigError(f"{source} not found: train the tiny runs first (python sft.py --preset tiny; python "
                          "dpo.py --preset tiny --model_id runs/tiny-sft), or pass --model_id / --reference_model")
    (identity, parts), done = done or outputs_done(source, name, s, backend)
    missing = [r for r in rows if r["instruction"] not in done]
    if missing:
        print(f"{name}: {len(rows) - len(missing)} outputs from before, generating {len(missing)} with {source}")
        with load_generator(loader_settings(s, source), backend) as generator:
            generate_outputs(generator, missing, name, source, path, s, identity, parts)
        done = read_outputs(path, source, generation, identity, parts)
    else:
        print(f"{name}: all {len(rows)} outputs generated before ({path})")
    outputs = [{k: (name if k == "generator" else done[r["instruction"]][k]) for k in OUTPUT_KEYS} for r in rows]
    write_json(path.with_suffix(".json"), outputs)
    return outputs

