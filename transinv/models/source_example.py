"""``example:NAME``: the constructed networks of ``transinv.examples``, whose answers are known."""

from __future__ import annotations

import fnmatch

from ..errors import UserError, did_you_mean
from .checkpoints import AS_BUILT, built_weights, load_checkpoint
from .loaded import LoadedModel, default_preprocess

PREFIX = "example"


class ExampleSource:
    """The networks of ``transinv.examples.EXAMPLES``, named with the ``example:`` prefix."""

    name = "example"
    prefix = PREFIX
    hint = "example:NAME (constructed networks with known answers)"

    def claims(self, spec: str) -> bool:
        return False  # only ever named with its prefix

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        from ..examples import EXAMPLES

        return [] if pretrained else fnmatch.filter([f"{PREFIX}:{name}" for name in EXAMPLES], pattern)

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        import torch

        from ..examples import EXAMPLES, OUTPUTS

        label = f"{PREFIX}:{spec}"
        if spec not in EXAMPLES:
            raise UserError(f"unknown example {spec!r}{did_you_mean(spec, list(EXAMPLES))}: use one of {', '.join(EXAMPLES)}")
        checkpoint = built_weights(label, weights)
        torch.manual_seed(seed)
        module = EXAMPLES[spec]()
        if checkpoint is not None:
            load_checkpoint(module, checkpoint)
        return LoadedModel(
            label, weights if checkpoint else AS_BUILT, module, default_preprocess(), label=label,
            preprocess_guessed=checkpoint is not None, output=OUTPUTS.get(spec, "classification"),
        )
