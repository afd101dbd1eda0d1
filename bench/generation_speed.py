"""Generation speed: batched against one-at-a-time, on the path label.py and evaluate.py use.

Both scripts load the model with alignkit.modeling.generation.load_generator, here on --backend transformers (the one
this CPU has: left-padded batches of prompts of similar length, through the chat template); label.py batches
--generation_batch_size (default 16) prompts, evaluate.py --batch_size (default 8). Here the same 48 prompts
(the benchmark's varied-length prompts: three batches of 16 once sorted by length, as label.py sorts its
prompts) are answered with batch sizes 1, 8 and 16, sampled at label.py's temperature 0.7, in rounds (at least
3) whose order alternates, so a change in the machine's load hits every batch size alike; a speedup is taken
within each round and reported as the median with its min-max. tokens/s counts generated tokens that are not
padding (rows that end early are padded until the batch's longest answer ends).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from bench import common

BATCH_SIZES = (1, 8, 16)


def _counting(model, tokenizer):
    """Wrap model.generate to count the new, non-pad tokens it returns."""
    original, counted = model.generate, {"tokens": 0}

    def generate(**kwargs):
        out = original(**kwargs)
        new = out[:, kwargs["input_ids"].shape[1]:]
        counted["tokens"] += int((new != tokenizer.pad_token_id).sum())
        return out

    model.generate = generate
    return counted


def worker(spec: dict) -> dict:
    import torch

    from alignkit.core.config import ModelSettings
    from alignkit.modeling.generation import load_generator
    from alignkit.core.progress import quiet_library_noise

    common.offline_env()
    quiet_library_noise()
    generate = load_generator(ModelSettings(model_id=spec["model"], quantization="none", dtype="fp32"), "transformers")
    rows = common.preference_rows(spec["prompts"], spec["length_scale"], seed=1)
    conversations = [row["prompt"] for row in rows]
    counted = _counting(generate.loaded.model, generate.loaded.tokenizer)
    generate(conversations[:2], max_new_tokens=4, batch_size=2)  # warm-up
    rounds = []  # {batch size: (tokens, seconds)} per round
    for round_ in range(spec["rounds"]):
        rounds.append({})
        for b in BATCH_SIZES if round_ % 2 == 0 else reversed(BATCH_SIZES):
            counted["tokens"] = 0
            started = time.perf_counter()
            generate(conversations, max_new_tokens=spec["max_new_tokens"], temperature=0.7, batch_size=b, seed=0)
            rounds[-1][b] = (counted["tokens"], time.perf_counter() - started)
    by_batch_size = {}
    for b in BATCH_SIZES:
        rates = [r[b][0] / r[b][1] for r in rounds]
        speedups = [rate / (r[1][0] / r[1][1]) for rate, r in zip(rates, rounds, strict=True)]
        by_batch_size[str(b)] = {
            "tokens": sum(r[b][0] for r in rounds), "seconds": sum(r[b][1] for r in rounds),
            "tokens_per_s": statistics.median(rates), "speedup": statistics.median(speedups),
            "speedup_range": {"min": min(speedups), "max": max(speedups), "rounds": speedups},
        }
    return {"prompts": spec["prompts"], "max_new_tokens": spec["max_new_tokens"], "rounds": spec["rounds"],
            "torch_threads": torch.get_num_threads(), "by_batch_size": by_batch_size}


def run(model: str, quick: bool) -> dict:
    # Prompts at 1/8 of full-scale length, and answers of up to 64 tokens: label.py's default 512, scaled alike.
    # The quick run answers shorter, not fewer prompts: with one batch of mixed lengths it would measure the
    # padding of an unsorted batch, which a real run of hundreds of sorted prompts rarely has.
    spec = {"model": model, "length_scale": 1 / 8, "prompts": 48, "max_new_tokens": 32 if quick else 64,
            "rounds": 3}
    result = common.run_worker("generation_speed", spec)
    result["batched_speedup"] = result["by_batch_size"]["16"]["speedup"]  # label.py's default batch
    result["batched_speedup_evaluate"] = result["by_batch_size"]["8"]["speedup"]  # evaluate.py's default batch
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON spec (bench.run_all makes it)")
    common.report(worker(json.loads(parser.parse_args().worker)))
