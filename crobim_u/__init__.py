"""CroBIM-U: uncertainty-driven referring segmentation for remote-sensing images.

Importing the package registers its classes with the transformers Auto factories, so installed users load
checkpoints without `trust_remote_code`; `register_for_auto_class` makes every saved folder carry the code for
those who do not have the package.
"""

from transformers import AutoConfig, AutoModel

from .configuration_crobim_u import CrobimUConfig
from .modeling_crobim_u import CrobimUForReferringSegmentation, CrobimUPreTrainedModel, CrobimUSegmentationOutput

__version__ = "0.1.0"

AutoConfig.register(CrobimUConfig.model_type, CrobimUConfig, exist_ok=True)
AutoModel.register(CrobimUConfig, CrobimUForReferringSegmentation, exist_ok=True)
CrobimUConfig.register_for_auto_class()
CrobimUForReferringSegmentation.register_for_auto_class("AutoModel")

__all__ = [
    "CrobimUConfig",
    "CrobimUForReferringSegmentation",
    "CrobimUPreTrainedModel",
    "CrobimUSegmentationOutput",
]
