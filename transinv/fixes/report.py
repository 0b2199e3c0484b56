"""What a fix did to a model (``FixReport``), what it refuses (``FixError``), and when to distrust it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UserError

# A variant that agrees with its base model on fewer of the unshifted images than this, or loses
# more accuracy than this, was probably wrecked by changing a trained network without fine-tuning.
COLLAPSE_AGREEMENT = 0.5
COLLAPSE_ACCURACY_DROP = 0.10


class FixError(UserError, ValueError):
    """A model (or a variant spec) that cannot be transformed; the one-line message names the layer.

    Also a ``UserError``, so the CLI prints the line instead of a traceback.
    """


@dataclass
class FixReport:
    """One fix applied to one model: the layers it changed and the strided layers it left alone."""

    fix: str
    replaced: list[str] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (where(layer), why it was left alone)
    verb: str = "replaced"
    noun: str = "strided layers"
    shown: int = 12  # layers named in the line; the rest are counted

    def line(self, model: str) -> str:
        """One line for stderr: ``blurpool:4 on resnet18: replaced 7 strided layers (...); kept layer conv1 ...``."""
        names = ", ".join(self.replaced[: self.shown])
        if len(self.replaced) > self.shown:
            names += f" and {len(self.replaced) - self.shown} more"
        done = f"{self.verb} {len(self.replaced)} {self.noun} ({names})" if self.replaced else "changed nothing"
        kept = "; ".join(f"kept {layer}: {why}" for layer, why in self.kept)
        return f"{self.fix} on {model}: {done}" + (f"; {kept}" if kept else "")


def where(path: str, module: object) -> str:
    """``layer PATH (Type)``: how messages name a layer."""
    return f"layer {path or '<model>'} ({type(module).__name__})"


def collapse_message(variant: str, agreement: float, accuracy: float | None, base_accuracy: float | None) -> str | None:
    """A warning when ``variant`` agrees with its base model's unshifted predictions on fewer than
    half of the images, or loses more than 10 points of accuracy; None when it does not."""
    drop = None if accuracy is None or base_accuracy is None else base_accuracy - accuracy
    if agreement >= COLLAPSE_AGREEMENT and (drop is None or drop <= COLLAPSE_ACCURACY_DROP):
        return None
    accuracy_text = "" if drop is None else f", accuracy {base_accuracy:.1%} -> {accuracy:.1%}"
    return (
        f"variant {variant} agrees with the base model on {agreement:.1%} of the unshifted images{accuracy_text}: "
        "the fix changed what the trained network computes, so its invariance is not comparable with the base's "
        "(the papers fine-tune after the change; --recalibrate-bn re-estimates batch-norm statistics)"
    )


class CollapseCheck:
    """Counts, over the measured images, how often a variant's unshifted top-1 class is its base
    model's, and how often each is right; ``counts`` is one float64 tensor, summed across processes."""

    def __init__(self, variant: str, device: torch.device | str = "cpu") -> None:
        self.variant = variant
        self.counts = torch.zeros(5, dtype=torch.float64, device=device)  # images, same, labelled, right: base, variant

    def add(self, base: torch.Tensor, variant: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: the base's and the variant's predicted classes on the unshifted views."""
        known = labels >= 0
        self.counts += torch.stack([
            torch.full((), len(labels), device=labels.device), (base == variant).sum(), known.sum(),
            (known & (base == labels)).sum(), (known & (variant == labels)).sum(),
        ]).to(self.counts)

    def message(self) -> str | None:
        images, same, labelled, base_right, variant_right = self.counts.tolist()
        if images == 0:
            return None
        accuracies = (variant_right / labelled, base_right / labelled) if labelled else (None, None)
        return collapse_message(self.variant, same / images, *accuracies)
