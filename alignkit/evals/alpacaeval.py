"""AlpacaEval win rates through the real `alpaca_eval` package (0.6.x), for `evaluate.py alpaca_eval`.

This module runs the command start to end (`run`) and sets up the tiny preset's eval set; the code of each step
below: 1-3 alignkit.evals.alpacaeval_outputs, 4 alignkit.evals.alpacaeval_annotate (the rule judge too),
5 alignkit.evals.alpacaeval_report.

The flow, and where each step lives in `--output_dir`:
1. The eval set: AlpacaEval's 805 instructions (the Hub file `tatsu-lab/alpaca_eval`
   alpaca_eval_gpt4_baseline.json, which also holds AlpacaEval 2's GPT-4 Turbo reference outputs), or any
   JSON/JSONL file of rows with an `instruction` (`--eval_set`); `--max_instances` keeps the first N.
2. Outputs in AlpacaEval's format (instruction, output, generator, dataset), generated with alignkit's own
   backends (alignkit.modeling.generation.load_generator: vLLM on a GPU, batched transformers elsewhere) and appended
   to `model_outputs/<name>.jsonl` batch by batch, so a killed run keeps every finished batch and a rerun
   generates only what is missing. `model_outputs/<name>.json` is the same in AlpacaEval's JSON list form.
3. References: `--reference_outputs FILE` (AlpacaEval's format), `--reference_model MODEL` (generated like 2),
   or AlpacaEval 2's reference outputs with the default eval set.
4. Annotations by `alpaca_eval.evaluate` itself: the annotator config's prompt template, its random output
   order, its parser (ranking JSON for alpaca_eval_gpt4, log-probs of the tokens m/M for
   weighted_alpaca_eval_gpt4_turbo), and its requests through alpaca_eval's own `openai_completions`, pointed
   at `--judge_base_url` with the key from the variable `--judge_api_key_env` names. Two stores make a
   rerun send no request twice:
   - alpaca_eval's annotation cache (`annotations/<config>-<key>.json`, rows keyed by instruction, both
     outputs and annotator), written after each chunk of rows. alpaca_eval's key leaves out the judge model,
     the endpoint and the config's content, so the file name carries a hash of those;
   - alignkit's request log (`annotations/requests-<config>-<key>.jsonl`): each judge answer appended the
     moment it arrives, keyed by the prompt, the endpoint and every decoding argument. A run killed inside a
     chunk loses no answer it paid for. A request that failed (alpaca_eval returns an empty text after its
     retries) is not logged, and its row is not cached as annotated, so a rerun asks again.
5. Metrics by alpaca_eval's own `get_length_controlled_winrate`: win_rate (mean of preference - 1, in %),
   standard_error, discrete_win_rate, and the length-controlled win rate of a logistic GLM
   P(model wins) = sigmoid(theta * tanh(delta_len / std(delta_len)) + phi * difficulty + psi) predicted at
   delta_len = 0 (AlpacaEval 2's length_controlled_v1, regularised towards its gamed baselines). On a set
   that is not AlpacaEval's, instruction difficulties do not exist, so `auto` picks length_controlled_minimal
   (no difficulty term, no regularisation).
   Written per comparison to `<config>/<reference>/`: alpaca_eval's leaderboard.csv and annotations.json,
   summary.json, and win_rates.png (win rate and LC win rate with +-1 standard error bars, every model in
   that leaderboard).

What alpaca_eval fetches at run time, and the offline path for each:
- the eval set / reference outputs: the Hub file above (`datasets.load_dataset` of AlpacaEval's loading script
  does not run under datasets >= 4, so alignkit fetches the JSON file itself): offline it comes from the Hub
  cache, else a clear error says to pass `--eval_set` and `--reference_outputs`;
- `df_gamed.csv` (instruction difficulties and gamed baselines) for length_controlled_v1: Hub cache or
  `--lc_data FILE`, else an error naming both and `--lc_glm length_controlled_minimal`;
- tiktoken encodings, only for configs with tokens_to_avoid/tokens_to_favor (alpaca_farm): checked before any
  request, with an error naming TIKTOKEN_CACHE_DIR.
alpaca_eval 0.6.6 imports `pkg_resources`, which setuptools >= 81 no longer ships: a two-function stand-in
(packaging's parse_version, importlib.metadata's version) is registered when the real one is missing.

`--judge_model rule` (the tiny preset): `rule_completions` stands in for the OpenAI call. It reads the
instruction and both outputs back from the prompt alpaca_eval rendered with weighted_alpaca_eval_gpt4_turbo's
template and answers with the log-probs of m/M the tiny preset's rule judge implies (1 for its winner, 0.5
each on a tie), so alpaca_eval's own order randomisation, parser, caching and metrics all run offline.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignkit.core.args import ConfigError
from alignkit.core.saved_settings import config_to_dict
from alignkit.core.journal import free_name, write_json
from alignkit.evals.alpacaeval_annotate import (
    LoggedCompletions, alpaca_eval_quiet, annotation_store, annotator_config, check_rule_config, check_tiktoken,
    endpoint, load_package,
)
from alignkit.evals.alpacaeval_outputs import (
    EVAL_FILE, HUB_REPO, check_file, check_name, default_name, load_eval_set, load_reference_outputs, model_outputs, outputs_path,
)
from alignkit.evals.alpacaeval_report import glm_setup, metric, plot, record_card_results

CHUNKSIZE = 64  # rows per alpaca_eval annotation chunk (its cache is written after each)


def keep_comparable(results_dir: Path, comparison: dict) -> None:
    """The leaderboard holds only models judged alike: the same judge and annotator config (`comparison["judge"]`,
    the annotation store's name), eval set and reference outputs. A leaderboard.csv made under other ones (or
    before alignkit recorded them) is moved aside as leaderboard-KEY.csv, so its rows are not ranked beside
    this run's; `comparison.json` says what the one in place was made under."""
    from alignkit.core.digests import digest

    key = digest(comparison, 12, ensure_ascii=True)
    record, leaderboard = results_dir / "comparison.json", results_dir / "leaderboard.csv"
    try:
        before = json.loads(record.read_text())["key"]
    except (OSError, ValueError, KeyError, TypeError):
        before = None
    if before != key and leaderboard.is_file():
        aside = free_name(results_dir, f"leaderboard-{before or 'unrecorded'}", ".csv")  # earlier ones stay too
        leaderboard.replace(aside)
        print(f"{leaderboard} ranked models judged under another judge, eval set or reference: moved to {aside}")
    write_json(record, {"key": key, "judge": comparison["judge"], "instances": len(comparison["eval_set"])})


def tiny_eval_set() -> Path:
    """The tiny preset's prompts as an AlpacaEval eval set (rows with `instruction`)."""
    from alignkit.modeling.presets import paths, tiny_dir

    path = tiny_dir() / "alpaca_eval_set.json"
    if not path.is_file():
        prompts = [json.loads(line)["prompt"] for line in Path(paths()["prompts"]).read_text().splitlines() if line]
        write_json(path, [{"instruction": p, "dataset": "tiny"} for p in dict.fromkeys(prompts)])
    return path


def tiny_defaults() -> dict:
    """The tiny preset for `evaluate.py alpaca_eval`: the demo's DPO run against its SFT run, rule-judged."""
    from alignkit.modeling.presets import defaults, tiny_dir

    return {**{k: v for k, v in defaults("evaluate").items() if k in ("quantization", "max_new_tokens", "temperature",
                                                                       "batch_size")},
            "model_id": "runs/tiny-dpo", "reference_model": "runs/tiny-sft", "judge_model": "rule",
            "eval_set": str(tiny_dir() / "alpaca_eval_set.json"), "output_dir": "outputs/alpaca_eval-tiny"}


def run(s, backend: str) -> dict:
    """evaluate.py alpaca_eval, start to end; returns the summary (also written to summary.json)."""
    import pandas as pd

    from alignkit.core.saved_settings import save_config

    use_rule = s.judge_model == "rule"
    # Absolute: alpaca_eval resolves a relative annotator config path against its own package folder.
    output_dir = Path(s.output_dir).resolve()
    # The local files first (a fix here before the key), then a missing key stops the run before any model is loaded.
    tiny_set = s.preset == "tiny" and s.eval_set == str(Path(tiny_defaults()["eval_set"]))  # written below
    for flag, path in (("--eval_set", None if tiny_set else s.eval_set), ("--reference_outputs", s.reference_outputs)):
        if path:
            check_file(path, flag)
    client = None if use_rule else endpoint(s)
    from alignkit.core.journal import hold

    # One run per folder: a second would generate the same outputs and pay the annotator again.
    hold(output_dir / ".evaluate.lock", "evaluate.py alpaca_eval", "let it finish, or pass another --output_dir")
    if tiny_set:
        tiny_eval_set()
    ae = load_package()
    config_path, config_name, annotators = annotator_config(s, output_dir)
    if use_rule:
        check_rule_config(annotators)
    else:
        check_tiktoken(annotators)
    save_config(s, output_dir / "alpaca_eval_config.json")  # secrets redacted

    # The eval set and both sides' outputs
    from alignkit.modeling.lineage import check_models

    check_models(s, [s.model_id, None if s.reference_outputs else s.reference_model],  # both, before either runs
                 "--model_id / --reference_model")
    rows, hub_references = load_eval_set(s.eval_set, s.max_instances)
    name = check_name(s.model_name or default_name(s.model_id), "--model_name")
    done = {}  # name: what outputs_done said, where asked before any generation
    if s.reference_outputs:
        references = load_reference_outputs(s.reference_outputs, rows, s.reference_name)
    elif s.reference_model:
        ref_name = check_name(s.reference_name or default_name(s.reference_model), "--reference_name")
        if ref_name == name:
            raise ConfigError(f"the model and the reference are both named {name!r}: pass --model_name or "
                              "--reference_name")
        from alignkit.evals.alpacaeval_outputs import outputs_done
        from alignkit.modeling.model_folders import check_model_sources

        # Both are there before the reference generates (the model was found missing only after it had).
        done = {named: outputs_done(source, named, s, backend) for source, named in ((s.reference_model, ref_name),
                                                                                     (s.model_id, name))}
        check_model_sources(s, [source for source, named in ((s.reference_model, ref_name), (s.model_id, name))
                                if any(r["instruction"] not in done[named][1] for r in rows)])
        references = model_outputs(s.reference_model, ref_name, rows, s, backend, done[ref_name])
    elif hub_references is not None:
        references = hub_references
    else:
        raise ConfigError("your own --eval_set needs references: --reference_outputs FILE (AlpacaEval's format) or "
                          "--reference_model MODEL")
    ref_name = check_name(references[0]["generator"] if not s.reference_name else s.reference_name, "--reference_name")
    for r in references:
        r["generator"] = ref_name
    if ref_name == name:
        raise ConfigError(f"the model and the reference are both named {name!r}: pass --model_name or --reference_name")
    outputs = model_outputs(s.model_id, name, rows, s, backend, done.get(name))

    # Annotations and metrics by alpaca_eval
    judge = "rule" if use_rule else next(iter(annotators.values()))["completions_kwargs"].get("model_name")
    cache, decoder = annotation_store(output_dir, config_name, annotators, client, s.parallel)
    results_dir = output_dir / config_name / ref_name
    results_dir.mkdir(parents=True, exist_ok=True)
    glm, table = glm_setup(s, rows, output_dir / "annotations")
    positions = {r["instruction"]: i for i, r in enumerate(rows)}
    leaderboard_csv = results_dir / "leaderboard.csv"
    keep_comparable(results_dir, {"judge": cache.name, "eval_set": [r["instruction"] for r in rows],
                                  "references": [(r["instruction"], r["output"]) for r in references]})
    print(f"annotating {len(rows)} pairs ({name} vs {ref_name}) with {config_name}, judge {judge}")
    with alpaca_eval_quiet(ae):
        leaderboard, annotations = ae.evaluate(
            model_outputs=pd.DataFrame(outputs), reference_outputs=pd.DataFrame(references),
            annotators_config=str(config_path), name=name, output_path=str(results_dir),
            precomputed_leaderboard=str(leaderboard_csv) if leaderboard_csv.exists() else None,
            is_overwrite_leaderboard=True, is_return_instead_of_print=True, is_cache_leaderboard=False,
            fn_metric=metric(positions, glm, table, results_dir / "glm_weights"), sort_by="length_controlled_winrate",
            annotation_kwargs={"chunksize": CHUNKSIZE}, caching_path=str(cache), fn_completions=decoder,
        )
    leaderboard.to_csv(leaderboard_csv)  # the same file alpaca_eval wrote, now sorted and with every model
    missing = int(pd.DataFrame(annotations)["preference"].isna().sum()) if annotations else 0
    row = leaderboard.loc[name]
    summary = {
        "model": name, "model_id": s.model_id, "reference": ref_name, "annotators_config": config_name,
        "judge_model": judge, "judge_base_url": None if use_rule else client["openai_api_base"],
        "eval_set": s.eval_set or f"{HUB_REPO}/{EVAL_FILE}", "instances": len(rows), "missing_annotations": missing,
        "glm": glm, **{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in row.items()},
        "requests": {"sent": decoder.sent, "reused": decoder.reused, "failed": decoder.failed}
        if isinstance(decoder, LoggedCompletions) else None,
        "files": {"leaderboard": str(leaderboard_csv), "annotations": str(results_dir / "annotations.json"),
                  "annotation_cache": str(cache), "outputs": str(outputs_path(output_dir, name).with_suffix(".json")),
                  "chart": str(results_dir / "win_rates.png")},
        "settings": config_to_dict(s),
    }
    write_json(results_dir / "summary.json", summary)
    record_card_results(s.model_id, summary)
    plot(leaderboard, results_dir / "win_rates.png", f"AlpacaEval vs {ref_name}; annotator {config_name}, judge {judge}")
    columns = [c for c in ("length_controlled_winrate", "lc_standard_error", "win_rate", "standard_error", "n_total",
                           "avg_length") if c in leaderboard]
    print(leaderboard[columns].to_string(float_format=lambda v: f"{v:.2f}"))
    if missing:
        print(f"{missing} annotations missing (the judge failed or answered off-format); a rerun asks again")
    print(f"\nsummary: {results_dir / 'summary.json'}\nchart:   {results_dir / 'win_rates.png'}")
    return summary
