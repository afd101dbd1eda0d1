"""alignkit: align language models with LoRA/QLoRA adapters on top of Hugging Face TRL.

The package holds the logic; the top-level cell scripts (sft.py, dpo.py, label.py, evaluate.py, merge.py,
reward.py) read like notebooks over it.
Modules: args (one config mechanism), config (every script's settings), models (one loader), data (one
normaliser), losses (preference losses TRL lacks), training (trainers and run folders), presets (the
offline `tiny` demo), generation, merge, hub, reward (reward.py's losses and trainer), rewards (reward models
as one callable and as label.py's judge).
"""

import logging

__version__ = "0.1.0"

# One named logger for the whole toolkit, so users can silence or raise it in one place.
logger = logging.getLogger("alignkit")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[alignkit] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def quiet_library_noise() -> None:
    """Keep the log to what the user can act on.

    transformers v5 warns on every step that TRL calls its renamed gradient-checkpointing helpers, and progress
    bars redraw by the line when there is no terminal: thousands of lines in a CI log.
    """
    import sys
    import warnings

    warnings.filterwarnings("ignore", message=r".*deprecated and will be removed in v6.*", category=FutureWarning)
    if not sys.stderr.isatty():
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
