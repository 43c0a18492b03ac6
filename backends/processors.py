"""Processors without a video processor, for the families whose video the explorer does not run yet
(SmolVLM): transformers 5 gives them a video processor, every real one of which needs torchvision.
LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL load their full processors, video processors included."""

from __future__ import annotations

import functools

import transformers


@functools.cache
def image_only(processor_class: type) -> type:
    """`processor_class`, a composite processor (SmolVLM), taking a plain
    `BaseVideoProcessor` as its video processor.

    transformers 5 insists on a video processor for these, and every real one needs torchvision,
    which CPU-only machines often cannot install (its wheels are built against CUDA torch). The
    explorer never processes video, so a stand-in that is never called takes its place: images,
    tokens and chat template are the processor's own. The subclass only widens the class check.
    """
    from transformers.video_processing_utils import BaseVideoProcessor

    class ImageOnly(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and type(argument) is BaseVideoProcessor:
                return BaseVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__  # what save_pretrained records
    return ImageOnly


def image_only_processor(processor_class: type, path: str, **hub):
    """The processor saved at `path`, without its video processor (see `image_only`)."""
    from transformers.video_processing_utils import BaseVideoProcessor

    parts = {
        "image_processor": transformers.AutoImageProcessor.from_pretrained(path, **hub),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(path, **hub),
        "video_processor": BaseVideoProcessor(),
    }
    cls = image_only(processor_class)
    settings, extra = cls.get_processor_dict(path, **hub)
    return cls.from_args_and_dict([parts[name] for name in cls.get_attributes()], settings, **extra)
