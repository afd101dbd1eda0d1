"""AI feedback: judges and reward models that turn pairs of answers into preference labels (label.py).

- judge: label.py's judges (endpoint, local model, Python rule), both answer orders; judge_templates: their prompts.
- labeling: label.py's pipeline (the plan, prompts, responses); label_inputs: its prompts and responses files read
  and checked; label_pairs: its pairs and their judging; label_records: its cache, keys, output and summary.
- rewards: reward models as one callable (label.py's rm: judge, judge.RMJudge, scores through it).
- pointwise: label.py --mode pointwise (one grade per answer against a threshold: KTO data).
- ratings: FastChat's single-answer grading (its single-v1 prompt and rating parser), for pointwise and rl.py.
"""
