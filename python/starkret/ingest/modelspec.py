"""Model names as other tools spell them, turned into open_clip's (name, pretrained).

* open_clip: ``ViT-L-14-336-quickgelu`` (+ ``pretrained="openai"``)
* clip-retrieval: ``open_clip:ViT-L-14-336-quickgelu/openai`` (``open_clip:NAME/TAG``,
  or ``open_clip:NAME`` for the model's default weights)
* OpenAI's ``clip`` package (clip-retrieval's default spelling): ``ViT-L/14@336px``,
  ``ViT-L/14``, ``ViT-B/16``, ``ViT-B/32``: OpenAI's weights, which need open_clip's
  ``-quickgelu`` configs.
"""

from __future__ import annotations

from typing import Any

from starkret.errors import InvalidInputError

__all__ = ["OPENAI_CLIP_NAMES", "normalise_model"]

#: OpenAI ``clip`` package names -> open_clip configs with QuickGELU.
OPENAI_CLIP_NAMES = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
}


def normalise_model(model: Any, pretrained: Any, default: Any) -> tuple[Any, Any]:
    """(open_clip name, pretrained) for ``model`` in any of the spellings above.

    A tag inside the name (``open_clip:NAME/TAG``) is used only when ``pretrained`` is
    ``default`` (not given); giving both different tags is an error.
    """
    if not isinstance(model, str):
        return model, pretrained
    if model in OPENAI_CLIP_NAMES:
        tag = "openai"
        model = OPENAI_CLIP_NAMES[model]
    elif model.startswith("open_clip:"):
        name, _, tag = model[len("open_clip:") :].partition("/")
        model, tag = name, (tag or None)
    else:
        return model, pretrained
    if tag is not None:
        if pretrained is default:
            pretrained = tag
        elif pretrained != tag:
            raise InvalidInputError(
                f"the model name says pretrained={tag!r} but pretrained={pretrained!r} was given"
            )
    return model, pretrained
