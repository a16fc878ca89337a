"""CroBIM-U: uncertainty-driven referring segmentation for remote-sensing images.

Importing the package registers its classes with the transformers Auto factories, so installed users load
checkpoints without `trust_remote_code`; `register_for_auto_class` makes every saved folder carry the code for
those who do not have the package.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_crobim_u import CrobimUConfig
from .image_processing_crobim_u import CrobimUImageProcessor
from .modeling_crobim_u import CrobimUForReferringSegmentation, CrobimUPreTrainedModel, CrobimUSegmentationOutput
from .pipeline_crobim_u import PIPELINE_TASK, CrobimUReferringSegmentationPipeline
from .processing_crobim_u import CrobimUProcessor

__version__ = "0.1.0"

AutoConfig.register(CrobimUConfig.model_type, CrobimUConfig, exist_ok=True)
AutoModel.register(CrobimUConfig, CrobimUForReferringSegmentation, exist_ok=True)
AutoImageProcessor.register(CrobimUConfig, image_processor_classes={"pil": CrobimUImageProcessor}, exist_ok=True)
AutoProcessor.register(CrobimUConfig, CrobimUProcessor, exist_ok=True)
PIPELINE_REGISTRY.register_pipeline(
    PIPELINE_TASK, pipeline_class=CrobimUReferringSegmentationPipeline, pt_model=AutoModel, type="multimodal"
)
CrobimUConfig.register_for_auto_class()
CrobimUForReferringSegmentation.register_for_auto_class("AutoModel")
CrobimUImageProcessor.register_for_auto_class("AutoImageProcessor")
CrobimUProcessor.register_for_auto_class("AutoProcessor")


def referring_segmentation_pipeline(model, **kwargs) -> CrobimUReferringSegmentationPipeline:
    """
    `pipeline("referring-image-segmentation", ...)` with this package's pipeline class: loads a checkpoint folder or
    Hub id (model and processor) without `trust_remote_code`, and its weights from safetensors only.
    """
    from transformers import pipeline

    # The classes are registered locally, so the checkpoint's own copy of the code is never needed here; weights load
    # from safetensors only, never from a pickled pytorch_model.bin.
    kwargs.setdefault("trust_remote_code", False)
    kwargs["model_kwargs"] = {"use_safetensors": True, **(kwargs.get("model_kwargs") or {})}
    return pipeline(PIPELINE_TASK, model=model, pipeline_class=CrobimUReferringSegmentationPipeline, **kwargs)


__all__ = [
    "CrobimUConfig",
    "CrobimUImageProcessor",
    "CrobimUProcessor",
    "CrobimUReferringSegmentationPipeline",
    "referring_segmentation_pipeline",
    "CrobimUForReferringSegmentation",
    "CrobimUPreTrainedModel",
    "CrobimUSegmentationOutput",
]
