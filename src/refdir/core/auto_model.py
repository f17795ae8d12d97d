"""Which transformers class builds a checkpoint, and under which names its tensors load.

Decoders load with the causal-LM auto class; vision-language checkpoints (a decoder beside an image encoder) whose
type only the image-text-to-text mapping knows load with that one, and refdir edits their text path. Checkpoints
may store tensors under other names than the model's parameters (transformers renames them on load); the streamed
edit, which reads the stored names, maps them the same way.
"""

from __future__ import annotations


def auto_class(config):
    """The transformers auto class that builds ``config``'s model with its language-model head: the causal-LM one,
    or, for a vision-language checkpoint whose type only the image-text-to-text mapping knows (Mistral 3, LLaVA,
    Qwen2.5-VL, Idefics 3, …: a decoder with an image encoder beside it), that one. refdir runs and edits only the
    text path; the image encoder is saved back unchanged."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    mt = getattr(config, "model_type", None)
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def checkpoint_renamer(model):
    """How transformers renames a checkpoint's tensor names to ``model``'s parameter names when it loads it (its
    conversion mapping: vision-language checkpoints store ``language_model.model.layers…`` or ``model.layers…`` for
    the model's ``model.language_model.layers…``; Granite 4.0 hybrids their fused experts as ``output_linear``), as
    a function of one name. Only pure renamings are applied: a tensor that a converter also reshapes or merges on
    load keeps its stored name (the streamed edit then matches it as before, or refuses it)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        transforms = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - another transformers version: names are taken as stored
        return lambda name: name
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(name: str) -> str:
        new, converted = rename_source_key(name, renames, converters)
        return name if converted is not None else new

    return rename
