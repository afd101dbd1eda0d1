"""Every script's settings: typed dataclasses with a default and a one-line help each, in one namespace.

The groups are shared by inheritance (alignkit.core.groups), so sft.py and dpo.py (and later scripts) expose the
same flag for the same thing; the training scripts' settings live in alignkit.core.train_settings, the others'
(label.py, evaluate.py, merge.py) in alignkit.core.tool_settings. `alignkit.core.args.parse_config` turns a class
into flags and environment variables (`--dpo_beta`, `DPO_BETA` or `ALIGNKIT_DPO_BETA`), reads `.env`,
`--config recipe.yaml` and the `--preset`; `python sft.py --help` lists them all.

Defaults are for a real GPU run and follow the seed project (Mistral-7B-Instruct-v0.2, UltraFeedback, QLoRA
NF4 with bf16 compute, LoRA on all linear layers, flash attention 2 when installed, beta 0.1). "auto" settings
are resolved at load time from the hardware, with one log line each (see alignkit.modeling.models).
"""

from __future__ import annotations

from alignkit.core.environment import SETTINGS_CLASSES
from alignkit.core.groups import (
    BatchingSettings,
    GenerationSettings,
    HubPushSettings,
    JudgeAnswerSettings,
    JudgeEndpointSettings,
    LoTASettings,
    ModelSettings,
    TemplateArgumentsSettings,
    TrainSettings,
    loader_settings,
)
from alignkit.core.tool_settings import (
    AlpacaEvalSettings,
    EvalSettings,
    LabelSettings,
    LMEvalSettings,
    MergeSettings,
    MTBenchSettings,
    PairwiseSettings,
    VibesSettings,
)
from alignkit.core.train_settings import (
    DPOSettings,
    KTOSettings,
    RewardSettings,
    RLAIFSettings,
    RLSettings,
    SFTSettings,
)

__all__ = [
    "ModelSettings", "loader_settings", "HubPushSettings", "JudgeEndpointSettings", "JudgeAnswerSettings",
    "TrainSettings", "LoTASettings", "BatchingSettings", "TemplateArgumentsSettings",
    "GenerationSettings",
    "SFTSettings", "DPOSettings", "RewardSettings", "RLSettings", "RLAIFSettings",
    "LabelSettings", "EvalSettings", "VibesSettings", "MTBenchSettings", "PairwiseSettings", "AlpacaEvalSettings",
    "MergeSettings", "KTOSettings", "LMEvalSettings",
]

# Every script's settings, so that parse_config can tell a variable meant for another script from a mistake.
SETTINGS_CLASSES.extend([SFTSettings, DPOSettings, RewardSettings, RLSettings, RLAIFSettings, KTOSettings,
                         LabelSettings, VibesSettings, MTBenchSettings, PairwiseSettings, AlpacaEvalSettings,
                         LMEvalSettings, MergeSettings])
