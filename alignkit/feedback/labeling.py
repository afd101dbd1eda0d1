"""label.py's pipeline: the plan (sources, pairing, judge, cache), the prompts, and the responses (read from a file,
found in the cache, or generated now). Its files are read and checked by alignkit.feedback.label_inputs. The pairs and their judgments are alignkit.feedback.label_pairs; the cache,
its keys, the output and the summary, alignkit.feedback.label_records (its docstring lists the files a run
writes). The thread pool and the progress bar are alignkit.core.journal's and alignkit.core.progress's; the Hub
upload is alignkit.core.hub.push_dataset.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from alignkit import logger
from alignkit.core.args import ConfigError, redact
from alignkit.core.saved_settings import save_config
from alignkit.core.data import DataError
from alignkit.core.errors import EndpointRefused
from alignkit.core.groups import loader_settings
from alignkit.core.journal import threaded
from alignkit.core.progress import Progress
from alignkit.core.digests import decisive_sampling, digest, sample_seed
from alignkit.core.llm import FirstFailures
from alignkit.feedback.judge import endpoint_identity, is_fatal, make_judge
from alignkit.feedback.label_inputs import by_prompt, check_inputs, no_match, prompts_from, response_rows
from alignkit.feedback.label_records import (AppendLog, Prompt, Run, Source, check_made, generator_fix, made,
                                              recount, report_failure)


# ---------------------------------------------------------------------------------------------------------
# The plan: everything that can be checked before any work


def _model_source(spec: str, name: str, index: int) -> Source:
    return Source(name, spec, "endpoint" if spec.startswith("openai:") else "local", index)


def plan_sources(s) -> tuple[list[Source], list[tuple[int, int]]]:
    """The response sources and the pairs among them, from --model_a/b, --responses_a/b or --num_samples."""
    if s.mode == "completions":
        if s.model_b or s.responses_a or s.responses_b:
            raise ConfigError("--mode completions writes one teacher's answers: name the teacher with --model_a "
                              "(or --model_id), without --model_b, --responses_a or --responses_b")
        teacher, n = s.model_a or s.model_id, max(1, s.num_samples)
        return [_model_source(teacher, teacher if n == 1 else f"{teacher} #{i + 1}", i) for i in range(n)], []
    if s.num_samples:
        if s.model_a or s.model_b or s.responses_a or s.responses_b:
            raise ConfigError(f"--num_samples {s.num_samples} samples every pair from --model_id, so it cannot be "
                              "combined with --model_a/--model_b/--responses_a/--responses_b; pass --num_samples 0 "
                              "to compare two sources (a preset may have set it)")
        if s.temperature == 0:
            raise ConfigError("--num_samples needs --temperature > 0: greedy samples of one model are all the same")
        sources = [_model_source(s.model_id, f"{s.model_id} #{i + 1}", i) for i in range(s.num_samples)]
        return sources, list(combinations(range(s.num_samples), 2))
    sources = []
    for index, (slot, model, file) in enumerate((("a", s.model_a, s.responses_a), ("b", s.model_b, s.responses_b))):
        if model and file:
            raise ConfigError(f"pass --model_{slot} or --responses_{slot}, not both")
        if not (model or file) and s.mode == "pointwise" and slot == "b" and sources:
            break  # each answer is graded alone: one source will do
        if not (model or file) and s.mode == "pointwise":
            raise ConfigError("--mode pointwise grades the answers of --model_a or --responses_a (and of --model_b or "
                              "--responses_b, if given); or --num_samples N samples them from --model_id")
        if not (model or file):
            raise ConfigError("pairs need two sources: --model_a or --responses_a, and --model_b or --responses_b; "
                              "or --num_samples N (N >= 2) to sample the pairs from --model_id")
        if file and not Path(file).is_file():
            raise ConfigError(f"--responses_{slot} {file}: no such file")
        sources.append(Source(file, file, "file", index) if file else _model_source(model, model, index))
    return sources, [(0, 1)] if len(sources) == 2 else []


def _endpoint(spec: str, s):
    from alignkit.core.llm import ChatClient

    model = spec.removeprefix("openai:")
    if not model:
        raise ConfigError(f"{spec!r}: name the endpoint's model after openai:, e.g. openai:gpt-4o-mini")
    return ChatClient(model, s.generation_base_url, s.generation_api_key_env, s.max_retries, s.request_timeout,
                      s.temperature, s.max_new_tokens, what=f"generator {spec} (--generation_api_key_env)")


def _slug(text: str) -> str:
    name = Path(str(text).rstrip("/")).name or str(text)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", re.sub(r"\.(jsonl|json|csv|parquet)$", "", name))[:40]


def prepare(s) -> Run:
    """Check the settings and the input files, build the judge (--mode pointwise: the grader,
    alignkit.feedback.pointwise.Grader) and endpoint clients (a missing key fails here, naming the variable), save
    the settings, and open the cache. Nothing is generated or sent yet."""
    from alignkit.modeling.generation import resolve_backend  # imports torch: not before a run needs it

    sources, pairing = plan_sources(s)
    # Once, before any work: --backend vllm without vLLM stops here; auto says which one it picked.
    backend = resolve_backend(s.backend) if any(src.kind == "local" for src in sources) else None
    prompt_source = s.prompts or s.responses_a or s.responses_b
    if not prompt_source:
        raise ConfigError("pass --prompts: a .jsonl/.json/.csv/.parquet file or a Hub dataset id, with the prompt "
                          f"in column {s.prompt_field!r} (see --prompt_field)")
    from alignkit.core.data_files import check_exists

    for given in (s.prompts, s.responses_a, s.responses_b):  # before the cache and the config are written
        if given:
            check_exists(given)
    kind = {"pairs": "preferences", "completions": "completions", "pointwise": "labels"}[s.mode]
    output = Path(s.output or f"runs/label-{_slug(prompt_source)}/{kind}.jsonl")
    if output.suffix != ".jsonl":
        raise ConfigError(f"--output {output}: name a .jsonl file (one JSON row a line, which dpo.py and sft.py read)")
    # A file that cannot be read stops the run before anything is written beside the output (and before the
    # judge's key is asked for: a bad file was reported only once the key was set)
    check_inputs(s)
    judge = make_judge(s) if s.mode == "pairs" else None
    if s.mode == "pointwise":
        from alignkit.feedback.pointwise import Grader

        grader = Grader(s)
    else:
        grader = None
    endpoints = {src.spec: _endpoint(src.spec, s) for src in sources if src.kind == "endpoint"}
    if s.push_to_hub:
        from alignkit.core.hub import require_token

        require_token()  # fail now, not after hours of judging
    cache_dir = Path(s.cache_dir) if s.cache_dir else output.with_suffix(".cache")
    output.parent.mkdir(parents=True, exist_ok=True)
    # The caches first: they take the lock, so a second run into the same output is refused before it writes
    # anything (it overwrote the running run's .config.json).
    judgments = AppendLog(cache_dir / "judgments.jsonl") if judge else None
    run = Run(s, output, cache_dir, sources, pairing, judge, endpoints, AppendLog(cache_dir / "responses.jsonl"),
              judgments, backend=backend, grader=grader)
    save_config(s, output.with_suffix(".config.json"))
    # The responses and judgments beside it, of the other modes and outputs: a pointwise run after a pairs run
    # generated (or paid for) every answer again.
    for log in (run.responses, judgments):
        if log is not None:
            log.read_beside(output)
    what = f"judge {judge.name}" + (f" with template {judge.template.name}" if judge.template else "") if judge else \
        f"{grader.name if grader else s.judge} grades each answer (--mode pointwise)" if s.mode == "pointwise" else "teacher completions"
    logger.info(f"label: {what}; responses from {', '.join(sorted({src.spec for src in sources}))}; cache "
                f"{cache_dir} ({len(run.responses)} responses"
                + (f", {len(judgments)} judgments" if judgments else "") + " cached)")
    return run


# ---------------------------------------------------------------------------------------------------------
# Prompts (read and checked by alignkit.feedback.label_inputs)


def load_prompts(run: Run) -> list[Prompt]:
    """The distinct prompts of --prompts (or of --responses_a; every row, repeats too, with `keep_rows`), in file
    order, at most --max_prompts; each keeps its place ("FILE: row N"), so a message about it can name it."""
    s = run.settings
    recount(run, "prompts")
    prompts, label = prompts_from(s, run.stats)
    if hasattr(judge := getattr(run, "judge", None), "check_prompts"):  # before any answer is generated
        judge.check_prompts(prompts)
    dropped = run.stats["duplicate prompts"]
    if not getattr(run, "unsaid", False):
        logger.info(f"{len(prompts)} prompts from {label}" + (f" ({dropped} repeated ones dropped)" if dropped else ""))
    if ended := run.stats["prompts ending with an answer"]:  # TRL would continue that answer instead: said, not silent
        logger.info(f"{ended} prompts end with an assistant turn: the model answers the turn before it anew (the "
                    "final answer is left out, not continued)")
    return made(run, "prompts", prompts)


def read_prompts(source, split="train", config=None, field="prompt", max_prompts=None, keep_rows=False,
                 unsaid=False, skip_invalid=False) -> list[Prompt]:
    """load_prompts for a source a script names itself (rl.py's and rlaif.py's --dataset_id, rlaif.py's
    --eval_prompts): the same reading, checks and messages. A single file is read whole: pass split "train".
    keep_rows: every row, repeats included, each Prompt with the whole row it came from (rl.py trains on every
    row, as TRL does, and hands the other columns to the rewards). unsaid: no "N prompts from" line (the caller
    says what it made of them). skip_invalid: a row that fails its checks is skipped, and how many were is said in
    one line (rl.py's --skip_invalid), instead of stopping at it."""
    from types import SimpleNamespace

    settings = SimpleNamespace(prompts=source, prompts_split=split, prompts_config=config, prompt_field=field,
                               max_prompts=max_prompts, responses_a=None, responses_b=None, keep_rows=keep_rows,
                               skip_invalid=skip_invalid)
    return load_prompts(SimpleNamespace(settings=settings, stats=Counter(), unsaid=unsaid))


def _generator_identities(run: Run, source: Source) -> list[dict]:
    """Everything that decides a generated response, except the prompt: its cache key derives from this.

    A local model: the model as loaded and the engine (alignkit.modeling.identity.model_identity: every loader
    setting, every file down its adapter chain, the GGUF file, --backend, the hardware). An
    endpoint: the server, the model name and the sampling sent (alignkit.feedback.judge.endpoint_identity). Both: the
    sampling settings, the seed and the sample number; greedy decoding (--temperature 0) reads neither the seed nor
    --top_p (decisive_sampling). Returned first as keys hold it, then, where it differs, as keys held it before greedy
    keys dropped them: a response cached then is found.
    """
    s = run.settings
    if source.kind == "local":
        from alignkit.modeling.identity import model_identity

        where = {"loaded": model_identity(loader_settings(run.settings, source.spec), run.backend)}
    else:
        where = endpoint_identity(run.endpoints[source.spec])
        if s.chat_template_kwargs:  # sent along (extra_body); left out when unset, so earlier answers still count
            where = {**where, "chat_template_kwargs": s.chat_template_kwargs}
    # A local model by its identity alone (one folder however its path is spelled, or moved), an endpoint's by name.
    made = {**where, "model": "local" if source.kind == "local" else source.spec, "index": source.index}
    sampling = {"temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_new_tokens, "seed": s.seed}
    now = {**made, **decisive_sampling(sampling)}
    return [now] + ([{**made, **sampling}] if decisive_sampling(sampling) != sampling else [])


def collect_responses(run: Run, prompts: list[Prompt]) -> list[list[str | None]]:
    """responses[source][prompt]: read from a file, found in the cache, or generated now (and cached at once);
    None when a file lacks the prompt or generation failed."""
    from alignkit.modeling.lineage import check_models

    check_made(run, prompts=prompts)
    recount(run, "responses")
    # Every local model, before the first generates: one over a part retrained in place was refused at its own
    # load, after the models before it had generated.
    check_models(run.settings, [src.spec for src in run.sources if src.kind == "local"], "--model_a / --model_b")
    table: list[list[str | None]] = [[None] * len(prompts) for _ in run.sources]
    todo = defaultdict(list)  # (kind, model) -> [(source number, prompt number, cache key)]
    for si, source in enumerate(run.sources):
        if source.kind == "file":
            column, rows = response_rows(source.spec, run.settings)
            found = by_prompt(column, rows)
            # A row without tools or chat_template_kwargs pairs with the prompt's turns (its file says none); a row
            # with them, with the prompt that has the same.
            # label.py's own output says --chat_template_kwargs under a row's own: the prompt generated so.
            kwargs = getattr(run.settings, "chat_template_kwargs", None)
            keys = [(p.generated_as(kwargs).key, p.key, p.turns_key) for p in prompts]  # made as now, first
            table[si] = [next((found[k] for k in three if k in found), None) for three in keys]
            if rows and prompts and not any(k in found for three in keys for k in three):
                raise DataError(no_match(source.spec, column, rows, prompts))
            missing = sum(t is None for t in table[si])
            if missing:
                logger.warning(f"{source.spec}: no response for {missing} of {len(prompts)} prompts; their pairs "
                               "are skipped")
            continue
        identities = _generator_identities(run, source)
        for pi, prompt in enumerate(prompts):
            # A prompt's own template arguments (tools, chat_template_kwargs) change what is generated.
            key, *before = (digest({"generator": identity, "prompt": prompt.messages,
                                    **({"template": prompt.template} if prompt.template else {})})
                            for identity in identities)
            if (cached := next((k for k in (key, *before) if k in run.responses), None)) is not None:
                table[si][pi] = run.responses.get(cached)["text"]
                if cached != key:  # kept under its key as now too: another --seed finds it
                    run.responses.append({**run.responses.get(cached), "key": key})
            else:
                todo[(source.kind, source.spec)].append((si, pi, key))
    for (kind, spec), cells in todo.items():
        generator = _load_generator(run, spec) if kind == "local" else None
        progress = Progress(f"generating with {spec}", len(cells), unit="response")
        stream = (_generate_local(run, generator, cells, prompts) if generator is not None
                  else _generate_endpoint(run, spec, cells, prompts))
        watch = FirstFailures("generation request", generator_fix(spec), len(cells))
        try:
            for (si, pi, key), text in stream:
                if isinstance(text, Exception):
                    watch.failed(text)  # may stop the run, in its own line
                    run.stats["generation errors"] += 1
                    report_failure(text, "generation request", run.stats["generation errors"])
                else:
                    watch.ok()
                    run.responses.append({"key": key, "source": run.sources[si].name, "text": text})
                    table[si][pi] = text
                progress.update(1, run.stats["generation errors"])
        finally:
            progress.close()
            if generator is not None:
                del stream
                generator.close()  # the judge (or the next generator) may need the memory
    return made(run, "responses", table, of=prompts)


def _load_generator(run: Run, spec: str):
    from alignkit.modeling.generation import load_generator

    return load_generator(loader_settings(run.settings, spec), run.backend)  # spec may be ID@REVISION


def _generate_local(run: Run, generator, cells, prompts):
    s = run.settings
    by_source = defaultdict(list)
    for cell in cells:
        by_source[cell[0]].append(cell)
    for si, group in by_source.items():
        # Chunks of prompts of similar length: a batch is padded to its longest prompt (alignkit.modeling.generation).
        group.sort(key=lambda cell: -sum(len(m["content"]) for m in prompts[cell[1]].messages))
        for start in range(0, len(group), s.generation_batch_size):
            chunk = group[start:start + s.generation_batch_size]
            # Seeded per prompt and sample (not by the cache key, which names the engine too): an answer is the
            # same whichever prompts share its batch, so a resumed run, another --generation_batch_size or
            # --max_prompts samples it alike, on either backend.
            seeds = [sample_seed(s.seed, run.sources[si].index, prompts[pi].key) for _, pi, _ in chunk]
            # One call per chunk on either backend: its answers are cached before the next chunk starts.
            texts = generator([prompts[pi].messages for _, pi, _ in chunk], max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p, batch_size=s.generation_batch_size,
                              seeds=seeds, templates=[prompts[pi].template for _, pi, _ in chunk])
            yield from zip(chunk, texts)


def _generate_endpoint(run: Run, spec: str, cells, prompts):
    client, s = run.endpoints[spec], run.settings
    extra = {"top_p": s.top_p} if s.top_p < 1 else {}

    def complete(cell):
        # A prompt's own tools go as the API's tools, answered in text (tool_choice none: an answer here is the
        # assistant's text, and a call alone would be an empty one); --chat_template_kwargs with the prompt's own on
        # top as vLLM's and SGLang's servers take them (extra_body), which other servers refuse in their own words.
        template = {**(s.chat_template_kwargs or {}), **prompts[cell[1]].template}
        tools = template.pop("tools", None)
        own = {**({"tools": tools, "tool_choice": "none"} if tools else {}),
               **({"extra_body": {"chat_template_kwargs": template}} if template else {})}
        return client.complete(prompts[cell[1]].messages, **extra, **own)

    for cell, result in threaded(complete, cells, s.parallel):
        if isinstance(result, Exception) and is_fatal(result):
            raise EndpointRefused(f"generator {spec} refused the request: {redact(str(result))}. Check the key, "
                               "--generation_base_url and the model name.") from None
        yield cell, result
