"""Generation speed: batched against one-at-a-time, on the path label.py and evaluate.py use.

Both scripts load the model with alignkit.modeling.generation.load_generator, here on --backend transformers (the one
this CPU has: left-padded batches of prompts of similar length, through the chat template); label.py batches
--generation_batch_size (default 16) prompts, evaluate.py --batch_size (default 8). Here the same prompts (the benchmark's varied-length prompts) are
answered with batch sizes 1, 8 and 16, sampled at label.py's temperature 0.7, in rounds whose order alternates
so a change in the machine's load hits every batch size alike. tokens/s counts generated tokens that are not
padding (rows that end early are padded until the batch's longest answer ends).
"""

from __future__ import annotations

import argparse
import json
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
    from alignkit.core.config import ModelSettings
    from alignkit.modeling.generation import load_generator
    from alignkit.train.training import quiet_library_noise

    common.offline_env()
    quiet_library_noise()
    generate = load_generator(ModelSettings(model_id=spec["model"], quantization="none", dtype="fp32"), "transformers")
    rows = common.preference_rows(spec["prompts"], spec["length_scale"], seed=1)
    conversations = [row["prompt"] for row in rows]
    counted = _counting(generate.loaded.model, generate.loaded.tokenizer)
    generate(conversations[:2], max_new_tokens=4, batch_size=2)  # warm-up
    totals = {b: {"tokens": 0, "seconds": 0.0} for b in BATCH_SIZES}
    for round_ in range(spec["rounds"]):
        for b in BATCH_SIZES if round_ % 2 == 0 else reversed(BATCH_SIZES):
            counted["tokens"] = 0
            started = time.perf_counter()
            generate(conversations, max_new_tokens=spec["max_new_tokens"], temperature=0.7, batch_size=b, seed=0)
            totals[b]["seconds"] += time.perf_counter() - started
            totals[b]["tokens"] += counted["tokens"]
    rates = {b: t["tokens"] / t["seconds"] for b, t in totals.items()}
    return {
        "prompts": spec["prompts"], "max_new_tokens": spec["max_new_tokens"], "rounds": spec["rounds"],
        "by_batch_size": {str(b): {**totals[b], "tokens_per_s": rates[b], "speedup": rates[b] / rates[1]}
                          for b in BATCH_SIZES},
    }


def run(model: str, quick: bool) -> dict:
    # Prompts at 1/8 of full-scale length, and answers of up to 64 tokens: label.py's default 512, scaled alike.
    spec = {"model": model, "length_scale": 1 / 8, "prompts": 16 if quick else 48,
            "max_new_tokens": 32 if quick else 64, "rounds": 1 if quick else 2}
    result = common.run_worker("generation_speed", spec)
    result["batched_speedup"] = result["by_batch_size"]["16"]["speedup"]  # label.py's default batch
    result["batched_speedup_evaluate"] = result["by_batch_size"]["8"]["speedup"]  # evaluate.py's default batch
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="JSON spec (bench.run_all makes it)")
    common.report(worker(json.loads(parser.parse_args().worker)))
