"""FastChat's single-answer grading, in one place: its "single-v1" judge prompt and its rating parser.

label.py --mode pointwise (alignkit.feedback.pointwise) and rl.py's --judge_mode pointwise
(alignkit.train.rl_rewards) both grade one answer on FastChat's 1-10 scale, so both read the rating as FastChat's
llm_judge/common.py `run_judge_single` reads it: the first "[[rating]]" in the judge's text, else the first
"[rating]", as a number; none when there is neither (FastChat records -1 there).
"""

from __future__ import annotations

import re

# FastChat llm_judge's "single-v1" (fastchat/llm_judge/data/judge_prompts.jsonl), word for word.
SINGLE_V1_NAME = "single-v1"
SINGLE_V1_SYSTEM = "You are a helpful assistant."
SINGLE_V1_PROMPT = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as the "
    "helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. Begin your "
    "evaluation by providing a short explanation. Be as objective as possible. After providing your explanation, "
    "you must rate the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for "
    "example: \"Rating: [[5]]\".\n\n[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n"
    "[The End of Assistant's Answer]"
)
# FastChat's one_score_pattern and one_score_pattern_backup.
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_rating(text: str | None) -> float | None:
    """The rating as FastChat reads it: the first [[x]], else the first [x]; None when there is none."""
    for pattern in (_RATING, _RATING_BACKUP):
        found = pattern.search(text or "")
        if found:
            return float(found.group(1))
    return None
