"""label.py's pairs and their judgments: which responses are paired and judged (each pair in both orders, or one
random order), and the judge asked for every judgment the cache lacks, `--parallel` at a time, each cached as it
arrives (the cache and the output: alignkit.feedback.label_records).
"""

from __future__ import annotations

from collections import defaultdict

from alignkit import logger
from alignkit.core.args import redact
from alignkit.core.errors import EndpointRefused, UserError, run_again, said_how_to_go_on
from alignkit.core.journal import batched, threaded
from alignkit.core.progress import Progress
from alignkit.core.digests import digest
from alignkit.core.llm import FirstFailures
from alignkit.feedback.judge import Request, orders_for, parse_verdict, question_text
from alignkit.feedback.label_records import (
    Pair, Prompt, Run, asked, check_made, judge_fix, made, recount, report_failure, to_ask_again,
)


def make_pairs(run: Run, prompts: list[Prompt], table) -> list[Pair]:
    """The pairs to judge, in prompt order. Missing, empty, identical and repeated pairs never reach the judge."""
    check_made(run, prompts=prompts, responses=table)
    recount(run, "pairs")
    if run.judge is None:
        return made(run, "pairs", [], of=table)
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
    return made(run, "pairs", pairs, of=table)


def judge_pairs(run: Run, pairs: list[Pair]) -> None:
    """Ask the judge for every judgment not in the cache, `--parallel` at a time, caching each as it arrives."""
    check_made(run, pairs=pairs)
    recount(run, "judgments")
    run.errors.clear()  # this judging's failures: one an earlier run of the cell had, asked again now, may be answered
    if not pairs:
        return
    judge, s = run.judge, run.settings
    keys = {key for pair in pairs for key in pair.keys.values()}
    unparsed = {key for key in keys if key in run.judgments and parse_verdict(run.judgments.get(key)["text"]) is None}
    retry = to_ask_again(unparsed, s, "judgments hold no verdict")
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
    watch = FirstFailures(asked(judge.name, "judge"), judge_fix(judge.name), len(needed))
    stream = batched(judge.judge_batch, needed.values(), s.generation_batch_size) if judge.batched else \
        threaded(judge.judge, needed.values(), s.parallel)
    try:
        for request, result in stream:
            if isinstance(result, Exception):
                if judge.fatal(result) and isinstance(result, UserError):  # its own line (a local judge's)
                    raise result
                if judge.fatal(result):
                    raise EndpointRefused(f"the judge refused the request: {redact(str(result))}. Check the API key, "
                                       "--judge_base_url (it usually ends in /v1) and --judge_model.") from None
                watch.failed(result)  # may stop the run, in its own line
                run.errors[request.key] = result
                report_failure(result, watch.what, len(run.errors))
            else:
                watch.ok()
                run.judgments.append({"key": request.key, "judge": judge.name, "verdict": parse_verdict(result),
                                      "text": result})
            finished = 0
            for n in waiting[request.key]:
                open_keys[n] -= 1
                finished += open_keys[n] == 0
            progress.update(finished, len(run.errors))
    except KeyboardInterrupt:  # this run's judgments, not the cache's (earlier runs', other judges')
        progress.close()  # its last line before the one saying what is kept (it came after it)
        left = sum(key not in run.judgments or key in retry and parse_verdict(run.judgments.get(key)["text"]) is None
                   for key in needed)
        logger.warning(f"interrupted: {len(keys) - left} of the {len(keys)} judgments these pairs need are safe in "
                       f"{run.judgments.path}; {run_again()} to ask for the other {left}")
        said_how_to_go_on()
        raise
    finally:
        progress.close()

