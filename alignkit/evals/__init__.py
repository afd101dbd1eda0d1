"""Evaluation: what evaluate.py runs.

- evaluation: evaluate.py's commands, vibes and the pairwise flow.
- mtbench: MT-Bench answers and judgments in FastChat's format.
- alpacaeval: evaluate.py alpaca_eval through the alpaca_eval package.
- fastchat_compat: FastChat's judge code adapted to today's stack.
- results: the pairwise flow's statistics, table and chart.
- harness: evaluate.py lm_eval through EleutherAI's lm-evaluation-harness (the alignment tax).
"""
