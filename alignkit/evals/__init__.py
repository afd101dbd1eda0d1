"""Evaluation: what evaluate.py runs.

- evaluation: evaluate.py's commands, vibes and the pairwise flow.
- named_models: --models NAME=ID_OR_PATH[@REVISION], the models mt_bench, pairwise and lm_eval compare.
- prompts_file: --prompts_file (pairwise's questions, vibes' prompts) read as single-turn questions.
- mtbench: MT-Bench's data and answers in FastChat's format; judgments: its judgments, one verdict a match.
- alpacaeval: evaluate.py alpaca_eval through the alpaca_eval package (the command), with
  alpacaeval_outputs (the eval set and each model's keyed outputs), alpacaeval_annotate (alpaca_eval's annotators
  at the judge endpoint, the request log and annotation cache) and alpacaeval_report (metrics, chart, card results).
- fastchat_compat: FastChat's judge code adapted to today's stack.
- results: the pairwise flow's statistics, table and chart.
- harness: evaluate.py lm_eval through EleutherAI's lm-evaluation-harness (the alignment tax), with harness_report
  (results.md's lines, the table and the chart).
"""
