"""label.py's machinery: prompts, response sources and pairs, generation and judging, output. The crash-safe
cache, the thread pool and the progress bar are alignkit.core.journal's; the Hub upload is
alignkit.core.hub.push_dataset.

A run writes, next to `--output X.jsonl`:
- `X.cache/responses.jsonl` and `X.cache/judgments.jsonl`: append-only logs, one JSON line per generated
  response or judge answer, flushed and fsync'd as it arrives. A judgment's key hashes what the judge saw (the
  prompt, the response in slot A, the one in slot B) and the judge's whole identity (Judge.identity: kind,
  model, template, endpoint, max tokens, temperature, or a local judge's weights and loader settings); a
  response's key hashes the prompt and its generator's identity (_generator_identity). A rerun after a crash,
  Ctrl-C or SIGKILL finds every answer it already has and asks only for the rest; a changed setting simply
  misses the cache. Failed requests are not cached, so a rerun retries them. An answer without a verdict was
  paid for: it stays cached, and only --retry_parse_failures asks again under the same settings.
- `X.jsonl`: rebuilt from the cache at the end of every run and replaced atomically, so each pair is in it once.
- `X.summary.json` (also printed as a table) and `X.config.json` (the settings, secrets redacted).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from alignkit import logger
from alignkit.core import journal
from alignkit.core.args import ConfigError, redact, save_config
from alignkit.core.data import DataError, hh_prompt_messages, is_hh_prompt
from alignkit.core.errors import EndpointRefused
from alignkit.core.journal import batched, threaded, write_json, write_jsonl
from alignkit.core.progress import Progress
from alignkit.feedback.judge import Judge, Request, combine, endpoint_identity, is_fatal, make_judge
from alignkit.feedback.judge import orders_for, parse_verdict, question_text, winner

RESPONSE_FIELDS = ("response", "completion", "output", "answer")
ROLES = ("system", "user", "assistant", "tool")


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class AppendLog(journal.AppendLog):
    """label.py's cache log (alignkit.core.journal.AppendLog): another run holding it is told how to proceed."""

    def __init__(self, path, owner: str = "label.py",
                 fix: str = "let it finish, or give this run its own --output or --cache_dir"):
        super().__init__(path, owner, fix)


# ---------------------------------------------------------------------------------------------------------
# The plan: everything that can be checked before any work


@dataclass(frozen=True)
class Source:
    """Where one column of responses comes from."""

    name: str  # recorded in output rows (chosen_source, rejected_source, generator)
    spec: str  # a model (Hub id, folder, openai:MODEL) or a responses file
    kind: str  # "local", "endpoint" or "file"
    index: int  # sample number, or slot (0 = A, 1 = B): part of the seeds and of the response cache keys


@dataclass
class Run:
    settings: object  # alignkit.core.config.LabelSettings
    output: Path
    cache_dir: Path
    sources: list[Source]
    pairing: list[tuple[int, int]]  # which sources are paired with which
    judge: Judge | None
    endpoints: dict  # openai:MODEL -> alignkit.core.llm.ChatClient
    responses: AppendLog
    judgments: AppendLog | None
    stats: Counter = field(default_factory=Counter)
    errors: dict = field(default_factory=dict)  # judgment key -> the exception of a request that failed
    backend: str | None = None  # "vllm" or "transformers" for local generators; None when there are none

    @property
    def summary_path(self) -> Path:
        return self.output.with_suffix(".summary.json")

    def close(self) -> None:
        self.responses.close()
        if self.judgments is not None:
            self.judgments.close()


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
        if not (model or file):
            raise ConfigError("pairs need two sources: --model_a or --responses_a, and --model_b or --responses_b; "
                              "or --num_samples N (N >= 2) to sample the pairs from --model_id")
        if file and not Path(file).is_file():
            raise ConfigError(f"--responses_{slot} {file}: no such file")
        sources.append(Source(file, file, "file", index) if file else _model_source(model, model, index))
    return sources, [(0, 1)]


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
    """Check the settings, build the judge and endpoint clients (a missing key fails here, naming the variable),
    save the settings, and open the cache. Nothing is generated or sent yet."""
    from alignkit.modeling.generation import resolve_backend  # imports torch: not before a run needs it

    sources, pairing = plan_sources(s)
    # Once, before any work: --backend vllm without vLLM stops here; auto says which one it picked.
    backend = resolve_backend(s.backend) if any(src.kind == "local" for src in sources) else None
    prompt_source = s.prompts or s.responses_a or s.responses_b
    if not prompt_source:
        raise ConfigError("pass --prompts: a .jsonl/.json/.csv/.parquet file or a Hub dataset id, with the prompt "
                          f"in column {s.prompt_field!r} (see --prompt_field)")
    kind = {"pairs": "preferences", "completions": "completions", "pointwise": "labels"}[s.mode]
    output = Path(s.output or f"runs/label-{_slug(prompt_source)}/{kind}.jsonl")
    if output.suffix != ".jsonl":
        raise ConfigError(f"--output {output}: name a .jsonl file (one JSON row a line, which dpo.py and sft.py read)")
    judge = make_judge(s) if s.mode == "pairs" else None
    endpoints = {src.spec: _endpoint(src.spec, s) for src in sources if src.kind == "endpoint"}
    if s.push_to_hub:
        from alignkit.core.hub import require_token

        require_token()  # fail now, not after hours of judging
    cache_dir = Path(s.cache_dir) if s.cache_dir else output.with_suffix(".cache")
    output.parent.mkdir(parents=True, exist_ok=True)
    save_config(s, output.with_suffix(".config.json"))
    judgments = AppendLog(cache_dir / "judgments.jsonl") if judge else None
    run = Run(s, output, cache_dir, sources, pairing, judge, endpoints, AppendLog(cache_dir / "responses.jsonl"),
              judgments, backend=backend)
    what = f"judge {judge.name}" + (f" with template {judge.template.name}" if judge.template else "") if judge else \
        f"{s.judge} grades each answer (--mode pointwise)" if s.mode == "pointwise" else "teacher completions"
    logger.info(f"label: {what}; responses from {', '.join(sorted({src.spec for src in sources}))}; cache "
                f"{cache_dir} ({len(run.responses)} responses"
                + (f", {len(judgments)} judgments" if judgments else "") + " cached)")
    return run


# ---------------------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    messages: list[dict]  # role/content turns ending with a user turn
    key: str = ""

    def __post_init__(self):
        self.key = digest(self.messages)


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _as_messages(value, where: str) -> list[dict]:
    """A prompt cell as role/content messages ending with a user turn. `where` is 'FILE: row N: field F'."""
    if is_hh_prompt(value):  # an HH prompt (split HH data): its turns, not one message holding the markers
        try:
            return hh_prompt_messages(value)
        except DataError as e:
            raise DataError(f"{where}: {e}. Fix the row.") from None
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
        while messages and messages[-1]["role"] == "assistant":  # a whole conversation: its last answer goes
            messages.pop()
        if messages and messages[-1]["role"] == "user" and messages[-1]["content"].strip():
            return messages
    raise DataError(f"{where}: expected non-empty text, or role/content messages with a user turn, got "
                    f"{_show(value)}. Fix the row, or point --prompt_field at the column holding the prompts.")


def _rows(source, split="train", config=None):
    from alignkit.core.data import load_rows

    data, label = load_rows(source, split, config)
    return data.column_names, data.to_list(), label


def _column(columns, wanted: str, label: str, flag: str, fallbacks=()) -> str:
    for name in (wanted, *fallbacks):
        if name in columns:
            return name
    raise DataError(f"{label}: no column {wanted!r} (columns: {', '.join(columns)}). Pass {flag} with the column "
                    "that holds it.")


def load_prompts(run: Run) -> list[Prompt]:
    """The distinct prompts of --prompts (or of --responses_a), in file order, at most --max_prompts."""
    s = run.settings
    if s.prompts:
        columns, rows, label = _rows(s.prompts, s.prompts_split, s.prompts_config)
    else:
        columns, rows, label = _rows(s.responses_a or s.responses_b)
    column = _column(columns, s.prompt_field, label, "--prompt_field", () if s.prompts else ("prompt",))
    prompts, seen = [], set()
    for number, row in enumerate(rows, 1):
        prompt = Prompt(_as_messages(row.get(column), f"{label}: row {number}: field '{column}'"))
        if prompt.key in seen:
            run.stats["duplicate prompts"] += 1
            continue
        seen.add(prompt.key)
        prompts.append(prompt)
        if s.max_prompts and len(prompts) >= s.max_prompts:
            break
    if not prompts:
        raise DataError(f"{label}: no prompts: the dataset is empty")
    dropped = run.stats["duplicate prompts"]
    logger.info(f"{len(prompts)} prompts from {label}" + (f" ({dropped} repeated ones dropped)" if dropped else ""))
    return prompts


# ---------------------------------------------------------------------------------------------------------
# Responses


def _response_text(value, where: str) -> str | None:
    """A response cell as text: a string, or an assistant message (list); None when the cell is null."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        if value[-1].get("role") != "assistant":
            raise DataError(f"{where}: expected the last message to be the assistant's, got role "
                            f"{value[-1].get('role')!r}. Fix the row.")
        value = value[-1].get("content")
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: expected the response as text or an assistant message, got {_show(value)}. "
                    "Fix the row, or pass --response_field with the right column.")


def read_responses(path: str, s) -> dict[str, str | None]:
    """A responses file as {prompt key: response}, matched to the prompts by the prompt itself (not by row)."""
    columns, rows, label = _rows(path)
    prompt_column = _column(columns, s.prompt_field, label, "--prompt_field", ("prompt",))
    if s.response_field == "auto":
        found = [c for c in RESPONSE_FIELDS if c in columns]
        if not found:
            raise DataError(f"{label}: no response column (looked for {', '.join(RESPONSE_FIELDS)}; columns: "
                            f"{', '.join(columns)}). Pass --response_field with the column that holds the responses.")
        response_column = found[0]
    else:
        response_column = _column(columns, s.response_field, label, "--response_field")
    out: dict[str, str | None] = {}
    for number, row in enumerate(rows, 1):
        where = f"{label}: row {number}: field"
        key = Prompt(_as_messages(row.get(prompt_column), f"{where} '{prompt_column}'")).key
        text = _response_text(row.get(response_column), f"{where} '{response_column}'")
        out.setdefault(key, text)  # a repeated prompt keeps its first response
    return out


def _generator_identity(run: Run, source: Source) -> dict:
    """Everything that decides a generated response, except the prompt: its cache key derives from this.

    A local model: the model as loaded and the engine (alignkit.modeling.identity.model_identity: every loader
    setting, every file down its adapter chain, the GGUF file, --backend, the hardware). An
    endpoint: the server, the model name and the sampling sent (alignkit.feedback.judge.endpoint_identity). Both: the
    sampling settings, the seed and the sample number.
    """
    s = run.settings
    if source.kind == "local":
        from alignkit.modeling.identity import model_identity

        where = {"loaded": model_identity(_loader_settings(run, source.spec), run.backend)}
    else:
        where = endpoint_identity(run.endpoints[source.spec])
    return {**where, "model": source.spec, "temperature": s.temperature, "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens, "seed": s.seed, "index": source.index}


def collect_responses(run: Run, prompts: list[Prompt]) -> list[list[str | None]]:
    """responses[source][prompt]: read from a file, found in the cache, or generated now (and cached at once);
    None when a file lacks the prompt or generation failed."""
    table: list[list[str | None]] = [[None] * len(prompts) for _ in run.sources]
    todo = defaultdict(list)  # (kind, model) -> [(source number, prompt number, cache key)]
    for si, source in enumerate(run.sources):
        if source.kind == "file":
            found = read_responses(source.spec, run.settings)
            table[si] = [found.get(p.key) for p in prompts]
            missing = sum(t is None for t in table[si])
            if missing:
                logger.warning(f"{source.spec}: no response for {missing} of {len(prompts)} prompts; their pairs "
                               "are skipped")
            continue
        identity = _generator_identity(run, source)
        for pi, prompt in enumerate(prompts):
            key = digest({"generator": identity, "prompt": prompt.messages})
            if key in run.responses:
                table[si][pi] = run.responses.get(key)["text"]
            else:
                todo[(source.kind, source.spec)].append((si, pi, key))
    for (kind, spec), cells in todo.items():
        generator = _load_generator(run, spec) if kind == "local" else None
        progress = Progress(f"generating with {spec}", len(cells), unit="response")
        stream = (_generate_local(run, generator, cells, prompts) if generator is not None
                  else _generate_endpoint(run, spec, cells, prompts))
        try:
            for (si, pi, key), text in stream:
                if isinstance(text, Exception):
                    run.stats["generation errors"] += 1
                    _report(text, "generation request", run.stats["generation errors"])
                else:
                    run.responses.append({"key": key, "source": run.sources[si].name, "text": text})
                    table[si][pi] = text
                progress.update(1, run.stats["generation errors"])
        finally:
            progress.close()
            if generator is not None:
                del stream
                generator.close()  # the judge (or the next generator) may need the memory
    return table


def _loader_settings(run: Run, spec: str):
    """The loader settings of local generator `spec`: what loads it, and what its cache key describes."""
    from alignkit.core.config import loader_settings

    return loader_settings(run.settings, spec)


def _load_generator(run: Run, spec: str):
    from alignkit.modeling.generation import load_generator

    return load_generator(_loader_settings(run, spec), run.backend)


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
            # Seeded per chunk (by its first prompt, not by the cache key, which names the engine too), so a
            # resumed run samples the same way whatever it already had, on either backend.
            seed = int(digest([s.seed, run.sources[si].index, prompts[chunk[0][1]].key])[:8], 16)
            # One call per chunk on either backend: its answers are cached before the next chunk starts.
            texts = generator([prompts[pi].messages for _, pi, _ in chunk], max_new_tokens=s.max_new_tokens,
                              temperature=s.temperature, top_p=s.top_p, batch_size=s.generation_batch_size, seed=seed)
            yield from zip(chunk, texts)


def _generate_endpoint(run: Run, spec: str, cells, prompts):
    client, s = run.endpoints[spec], run.settings
    extra = {"top_p": s.top_p} if s.top_p < 1 else {}
    for cell, result in threaded(lambda c: client.complete(prompts[c[1]].messages, **extra), cells, s.parallel):
        if isinstance(result, Exception) and is_fatal(result):
            raise EndpointRefused(f"generator {spec} refused the request: {redact(str(result))}. Check the key, "
                               "--generation_base_url and the model name.") from None
        yield cell, result


def _report(error: Exception, what: str, count: int) -> None:
    """Log the first few failures in full (secrets redacted); the rest are only counted."""
    if count <= 3:
        logger.warning(f"{what} failed: {type(error).__name__}: {redact(str(error))[:300]}")
    elif count == 4:
        logger.warning(f"more {what}s failed; counting them in the summary")


# ---------------------------------------------------------------------------------------------------------
# Pairs and judging


@dataclass
class Pair:
    prompt: Prompt
    a: str
    b: str
    source_a: str
    source_b: str
    keys: dict[str, str] = field(default_factory=dict)  # order ("ab" or "ba") -> judgment cache key


def make_pairs(run: Run, prompts: list[Prompt], table) -> list[Pair]:
    """The pairs to judge, in prompt order. Missing, empty, identical and repeated pairs never reach the judge."""
    if run.judge is None:
        return []
    s, pairs, seen = run.settings, [], set()
    identity = run.judge.identity()
    for pi, prompt in enumerate(prompts):
        for i, j in run.pairing:
            a, b = table[i][pi], table[j][pi]
            run.stats["pairs"] += 1
            if a is None or b is None:
                run.stats["missing response"] += 1
            elif not a.strip() or not b.strip():
                run.stats["empty response"] += 1
            elif a.strip() == b.strip():
                run.stats["identical"] += 1
            elif (prompt.key, frozenset((a.strip(), b.strip()))) in seen:
                run.stats["repeated pair"] += 1
            else:
                seen.add((prompt.key, frozenset((a.strip(), b.strip()))))
                pair = Pair(prompt, a, b, run.sources[i].name, run.sources[j].name)
                coin = int(digest([s.seed, prompt.key, a, b])[:8], 16)
                # A judge that scores each answer on its own (a reward model) has no order bias: one order.
                for order in orders_for(s.both_orders and not getattr(run.judge, "one_pass", False), coin):
                    slot_a, slot_b = (a, b) if order == "ab" else (b, a)
                    pair.keys[order] = digest({"prompt": prompt.messages, "a": slot_a, "b": slot_b, **identity})
                pairs.append(pair)
    skipped = run.stats["pairs"] - len(pairs)
    logger.info(f"{len(pairs)} pairs to judge" + (f" ({skipped} skipped: see the summary)" if skipped else ""))
    return pairs


def judge_pairs(run: Run, pairs: list[Pair]) -> None:
    """Ask the judge for every judgment not in the cache, `--parallel` at a time, caching each as it arrives."""
    if not pairs:
        return
    judge, s = run.judge, run.settings
    keys = {key for pair in pairs for key in pair.keys.values()}
    # A paid answer without a verdict stays recorded and is reused: asking again under the very same settings
    # is a choice the user makes (--retry_parse_failures), not something a rerun does behind their back.
    unparsed = {key for key in keys if key in run.judgments and parse_verdict(run.judgments.get(key)["text"]) is None}
    if unparsed:
        logger.info(f"{len(unparsed)} cached judgments hold no verdict; " + (
            "asking again (--retry_parse_failures)" if s.retry_parse_failures else
            "kept as parse failures (--retry_parse_failures asks again under the same settings)"))
    retry = unparsed if s.retry_parse_failures else set()
    needed: dict[str, Request] = {}
    waiting = defaultdict(list)  # key -> pairs waiting for it
    open_keys = []
    for n, pair in enumerate(pairs):
        missing = {key for key in pair.keys.values() if key not in run.judgments or key in retry}
        open_keys.append(len(missing))
        for order, key in pair.keys.items():
            if key in missing and key not in needed:
                slot_a, slot_b = (pair.a, pair.b) if order == "ab" else (pair.b, pair.a)
                needed[key] = Request(key, question_text(pair.prompt.messages), slot_a, slot_b, pair.prompt.messages)
        for key in missing:
            waiting[key].append(n)
    run.stats["judgments needed"] = len(keys)
    run.stats["judgments sent"] = len(needed)
    progress = Progress("judging", len(pairs), done=sum(k == 0 for k in open_keys))
    stream = batched(judge.judge_batch, needed.values(), s.generation_batch_size) if judge.batched else \
        threaded(judge.judge, needed.values(), s.parallel)
    try:
        for request, result in stream:
            if isinstance(result, Exception):
                if judge.fatal(result):
                    raise EndpointRefused(f"the judge refused the request: {redact(str(result))}. Check the API key, "
                                       "--judge_base_url (it usually ends in /v1) and --judge_model.") from None
                run.errors[request.key] = result
                _report(result, "judge request", len(run.errors))
            else:
                run.judgments.append({"key": request.key, "judge": judge.name, "verdict": parse_verdict(result),
                                      "text": result})
            finished = 0
            for n in waiting[request.key]:
                open_keys[n] -= 1
                finished += open_keys[n] == 0
            progress.update(finished, len(run.errors))
    except KeyboardInterrupt:
        logger.warning(f"interrupted: {len(run.judgments)} judgments are safe in {run.judgments.path}; run the same "
                       "command again to resume")
        raise
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------------------------
# Output and summary


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_output(run: Run, prompts: list[Prompt], table, pairs: list[Pair]) -> dict:
    """Write the output rows (rebuilt from the cache) and the summary; return the summary."""
    if run.judge is None:
        rows = []
        for si, source in enumerate(run.sources):
            for pi, prompt in enumerate(prompts):
                text = table[si][pi]
                if text is None:
                    run.stats["missing completion"] += 1
                elif not text.strip():
                    run.stats["empty completion"] += 1
                else:
                    rows.append({"prompt": prompt.messages, "completion": _assistant(text), "generator": source.name})
        write_jsonl(run.output, rows)  # readers see the old file or the new one, never half of one
        summary = _completion_summary(run, prompts, rows)
    else:
        rows, outcomes, verdicts = [], Counter(), []
        for pair in pairs:
            if any(key not in run.judgments for key in pair.keys.values()):
                outcomes["error"] += 1
                continue
            found = {order: parse_verdict(run.judgments.get(key)["text"]) for order, key in pair.keys.items()}
            verdicts.append(found)
            outcome = combine(found)
            outcomes[outcome] += 1
            if outcome in ("a", "b"):
                chosen, rejected = (pair.a, pair.b) if outcome == "a" else (pair.b, pair.a)
                sources = (pair.source_a, pair.source_b) if outcome == "a" else (pair.source_b, pair.source_a)
                # The verdicts as the judge gave them, named by where the chosen response sat.
                named = dict(sorted(
                    (("chosen_in_A" if (order == "ab") == (outcome == "a") else "chosen_in_B"), v)
                    for order, v in found.items()))
                rows.append({
                    "prompt": pair.prompt.messages, "chosen": _assistant(chosen), "rejected": _assistant(rejected),
                    "chosen_source": sources[0], "rejected_source": sources[1], "judge": run.judge.name,
                    "judge_template": run.judge.template.name if run.judge.template else None, "verdicts": named,
                    **_label_fields(run, pair, outcome),
                })
        write_jsonl(run.output, rows)
        summary = _pair_summary(run, prompts, pairs, outcomes, verdicts, rows)
        if pairs and not rows:
            logger.warning("no pair was labeled: the summary shows why (ties, disagreements between the orders, "
                           "answers without a verdict, errors)")
    write_json(run.summary_path, summary)
    return summary


def _label_fields(run: Run, pair: Pair, outcome: str) -> dict:
    """What a judge adds to a labeled row (a reward model: the two scores); nothing for text judges."""
    fields = getattr(run.judge, "label_fields", None)
    if fields is None:
        return {}
    texts = {order: run.judgments.get(key)["text"] for order, key in pair.keys.items()}
    chosen_slot = {order: "A" if (order == "ab") == (outcome == "a") else "B" for order in pair.keys}
    return fields(texts, chosen_slot)


def _share(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def _tokens(run: Run) -> dict:
    usage = {"judge": run.judge.usage() if run.judge else None}
    for spec, client in run.endpoints.items():
        usage[spec] = client.usage.as_dict()
    return {name: u for name, u in usage.items() if u}


def _pair_summary(run, prompts, pairs, outcomes, verdicts, rows) -> dict:
    parsed = [v for found in verdicts for v in found.values() if v is not None]
    both = [found for found in verdicts if len(found) == 2 and None not in found.values()]
    agree = sum(winner("ab", f["ab"]) == winner("ba", f["ba"]) for f in both)
    st = run.stats
    return {
        "output": str(run.output), "judge": run.judge.name,
        "template": run.judge.template.name if run.judge.template else None, "both_orders": run.settings.both_orders,
        "prompts": len(prompts), "pairs": st["pairs"],
        "skipped": {"identical": st["identical"], "empty": st["empty response"], "missing": st["missing response"],
                    "repeated": st["repeated pair"], "generation_errors": st["generation errors"]},
        "pairs_judged": len(pairs), "labeled": len(rows), "ties": outcomes["tie"],
        "disagreements": outcomes["disagree"], "parse_failures": outcomes["unparsed"], "errors": outcomes["error"],
        "agreement": _share(agree, len(both)) if run.settings.both_orders else None,
        "slot_a_wins": _share(parsed.count("A"), len(parsed)), "slot_b_wins": _share(parsed.count("B"), len(parsed)),
        "tie_verdicts": _share(parsed.count("tie"), len(parsed)),
        "judgments": {"needed": st["judgments needed"], "sent_this_run": st["judgments sent"],
                      "from_cache": st["judgments needed"] - st["judgments sent"], "failed": len(run.errors)},
        "tokens_this_run": _tokens(run),
    }


def _completion_summary(run, prompts, rows) -> dict:
    st = run.stats
    return {"output": str(run.output), "mode": "completions", "prompts": len(prompts), "completions": len(rows),
            "empty": st["empty completion"], "missing": st["missing completion"],
            "generation_errors": st["generation errors"], "tokens_this_run": _tokens(run)}


_LABELS = {
    "agreement": "agreement of the two orders", "slot_a_wins": "slot A wins (position bias)",
    "slot_b_wins": "slot B wins", "tie_verdicts": "tie verdicts", "parse_failures": "parse failures (no verdict)",
    "pairs": "pairs (before skipping)", "tokens_this_run": "tokens used this run",
}


def format_summary(summary: dict) -> str:
    """The summary as a two-column table, shares as percentages."""
    def show(value):
        if isinstance(value, float):
            return f"{value:.1%}"
        if isinstance(value, dict):
            return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
        return "n/a" if value is None else str(value)

    lines = []
    for key, value in summary.items():
        label = _LABELS.get(key, key.replace("_", " "))
        if isinstance(value, dict):
            lines.append(f"{label}:" + ("" if value else " none"))
            lines += [f"  {_LABELS.get(k, k.replace('_', ' ')):<30} {show(v)}" for k, v in value.items()]
        else:
            lines.append(f"{label:<32} {show(value)}")
    return "\n".join(lines)
