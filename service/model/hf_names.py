"""transformers ≥ 5 in-memory DeiT/ViT names → the names ``save_pretrained`` writes (the layout our model uses).

transformers 5 renamed its modules (``layers.N.attention.q_proj`` for ``encoder.layer.N.attention.attention.query``
…) and converts back when it saves; a state dict saved by hand (``torch.save(model.state_dict())``) keeps the new
names. A pure ``state_dict → state_dict`` function, so both spellings load through one strict path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from service.errors import CheckpointError

_LAYER = re.compile(r"^((?:deit|vit)\.)?layers\.(\d+)\.(.+)$")
_IN_LAYER = {
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
    "attention.o_proj.": "attention.output.dense.",
    "mlp.fc1.": "intermediate.dense.",
    "mlp.fc2.": "output.dense.",
    "layernorm_before.": "layernorm_before.",
    "layernorm_after.": "layernorm_after.",
}


def has_transformers5_names(state: Mapping[str, Tensor]) -> bool:
    return any(_LAYER.match(k) for k in state)


def from_transformers5_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the encoder blocks; embeddings, final norm, pooler, heads and decoder kept their names in v5."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _LAYER.match(key)
        new = key
        if match:
            prefix, index, rest = match.groups()
            for old_part, new_part in _IN_LAYER.items():
                if rest.startswith(old_part):
                    new = f"{prefix or ''}encoder.layer.{index}.{new_part}{rest[len(old_part) :]}"
                    break
        if new in out:
            raise CheckpointError(f"tensor {key!r} and another tensor both map to {new!r}")
        out[new] = value
    return out
