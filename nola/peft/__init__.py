"""NOLA as a PEFT method: `from nola.peft import NolaConfig`, then `peft.get_peft_model(model, NolaConfig(...))`,
`PeftModel.from_pretrained`, or TRL's `SFTTrainer(peft_config=NolaConfig(...))`.

Importing this package registers the string peft type "NOLA" in PEFT's mappings. PEFT's `register_peft_method`
accepts only names of its own enum; a string peft type works in its mappings since PR #2635. peft and trl are the
optional extra `nola[peft]`, at the versions it is tested with (peft 0.21, trl 1.16) and up.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

from nola.peft.config import PEFT_TYPE, NolaConfig
from nola.peft.layer import Linear, NolaLayer
from nola.peft.model import PREFIX, NolaModel


def register() -> None:
    """Put NOLA into PEFT's three mappings (idempotent: a second import or call changes nothing)."""
    PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_TYPE] = NolaConfig
    PEFT_TYPE_TO_TUNER_MAPPING[PEFT_TYPE] = NolaModel
    PEFT_TYPE_TO_PREFIX_MAPPING[PEFT_TYPE] = PREFIX


register()

__all__ = ["PEFT_TYPE", "Linear", "NolaConfig", "NolaLayer", "NolaModel", "register"]
