"""Every option of a measurement, once: its type, default, help, group and check.

``MeasureOptions`` is the single home that the CLI's flags (and their help), the YAML presets,
the settings recorded in every result file and the README's flag reference are all read from.
``validate()`` checks everything that can be checked before a model is built; its errors name
the option (``batch_size must be at least 1``) and the CLI turns the name into its flag.
This module imports no torch, so ``transinv --help`` stays fast.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence, Union

from .errors import UserError, did_you_mean
from .metric_registry import LAYER_METRICS

MODES: tuple[str, ...] = ("crop", "circular", "pad", "embed")
DIRECTIONS: tuple[str, ...] = ("x", "y", "diagonal", "grid")
SUBPIXEL_METHODS: tuple[str, ...] = ("fourier", "bilinear")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
PADDING_MODES: tuple[str, ...] = ("zeros", "circular", "reflect", "replicate")
TASKS: tuple[str, ...] = ("classification", "embedding", "segmentation")  # transinv.models.outputs' kinds

WHAT, SHIFTS, PREPROCESS, FIXES, RUN = "What to measure", "How to shift", "Preprocessing", "Fixes", "How to run"
GROUPS = (WHAT, SHIFTS, PREPROCESS, FIXES, RUN)


class OptionError(UserError, ValueError):
    """A bad value of one option: ``str()`` names the option as the library spells it
    (``batch_size``); the CLI prints ``flag`` (``--batch-size``) instead."""

    def __init__(self, option: str, detail: str) -> None:
        super().__init__(f"{option} {detail}")
        self.option, self.detail = option, detail

    def as_flag(self) -> str:
        return f"{flag(self.option)} {self.detail}"


def flag(option: str) -> str:
    """The CLI flag of an option name: ``batch_size`` -> ``--batch-size``."""
    return "--" + option.replace("_", "-")


def flag_declaration(f: Field) -> str:
    """How the CLI declares an option's flag: a switch pair for a yes/no option
    (``--prefetch/--no-prefetch``), so a default of yes can be turned off."""
    return f"{flag(f.name)}/--no-{flag(f.name)[2:]}" if base_type(f) is bool else flag(f.name)


def _opt(default: Any, help: str, group: str, *, choices: Sequence[str] | None = None,
         metavar: str | None = None, repeat: bool = False) -> Any:
    """A dataclass field carrying its help, group and choices for the CLI and the docs."""
    meta = {"help": help, "group": group, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "repeat": repeat}
    return field(default=default, metadata=meta)


def _rgb(value: Any, option: str) -> tuple[float, ...] | None:
    """Three floats (R, G, B) from ``"0.5,0.5,0.5"``, a sequence, or None."""
    if value is None:
        return None
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        raise OptionError(option, f"takes comma-separated numbers, e.g. 0.485,0.456,0.406 (got {value!r})") from None
    if len(numbers) != 3:
        raise OptionError(option, f"takes three numbers (R,G,B), got {len(numbers)}")
    return numbers


def _names(value: Any) -> tuple[str, ...] | None:
    """A tuple of names from a comma-separated string or a sequence (blanks dropped; None or
    nothing left: None)."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(p.strip() for p in parts if p.strip()) or None


def _strings(value: Any) -> tuple[str, ...] | None:
    """A tuple of strings from one string or a sequence (None stays None)."""
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


@dataclass(frozen=True)
class MeasureOptions:
    """How to measure: every setting of ``transinv measure`` except the models and the output file.

    Build it from keywords (``MeasureOptions(shift="0..8", mean="0.5,0.5,0.5")``: strings and
    sequences are both accepted and normalised), from a preset (``from_mapping``), or from flags.
    """

    # what to measure
    weights: str | dict[str, str] = _opt("DEFAULT", "DEFAULT, a weights name (IMAGENET1K_V1), none (seeded random init), auto (DEFAULT where cached or downloadable, else none with a note), or a checkpoint path. A preset or notebook may give a model -> weights mapping (models it does not name get DEFAULT).", WHAT)
    data: tuple[str, ...] | None = _opt(None, "Image folder, ImageFolder tree or file; repeat for several. Default: the built-in images.", WHAT, metavar="PATH", repeat=True)
    num_images: int | None = _opt(None, "Measure a random subset of this many images (seeded by --sample-seed).", WHAT)
    layers: str = _opt("default", "Layers to measure: default (stage outputs and the first layer at each new stride), all (each distinct map once), none (output only), or names and globs (layer3.*), comma-separated.", WHAT)
    layer_metrics: tuple[str, ...] | None = _opt(None, "Per-layer metrics to compute, comma-separated (default: all: " + ", ".join(LAYER_METRICS) + "); fewer run faster (see README, Speed).", WHAT, metavar="LIST")
    by_correctness: bool = _opt(False, "Also split top-1 agreement and consistency by whether the unshifted prediction was correct.", WHAT)
    attribution: str | None = _opt(None, "Also split the output's Lie derivative (an infinitesimal shift along --direction) into contributions of every leaf layer that add up to it: lie (Gruver et al. 2023; see README).", WHAT, choices=("lie",))
    task: str | None = _opt(None, "What the model outputs: classification (logits), embedding (a vector per image) or segmentation (N, K, H, W class maps). Default: detected (4-D or 'out' maps: segmentation; timm num_classes=0: embedding; else classification).", WHAT, choices=TASKS)
    label: tuple[str, ...] | None = _opt(None, "Label for the model in rows and tables (default: its short name); repeat once per model.", WHAT, repeat=True)
    seed: int = _opt(0, "Seed for random weights and random offsets (--consistency, --random-shifts).", WHAT)
    sample_seed: int = _opt(0, "Seed for the --num-images subset (apart from --seed, so new offsets keep the images).", WHAT)
    per_image: str | None = _opt(None, "Also write one CSV row per image and shift to this file: label, the reference and shifted views' top-1 classes and probabilities, and whether the class flipped.", WHAT, metavar="FILE")
    error_maps: str | None = _opt(None, "Also save each layer's mean absolute equivariance error per feature position, per shift, to this .npz file.", WHAT, metavar="PATH")
    # how to shift
    shift: str = _opt("0..16", "Shifts in pixels: 0..16, -8..8, 0..32:4, 0,1,2,4,8 or 5; 'A;B' for sets expanded apart. Shift 0 is always the reference.", SHIFTS)
    direction: str = _opt("x", "Shift direction (grid = every (dx, dy) pair).", SHIFTS, choices=DIRECTIONS)
    mode: str = _opt("crop", "How views are shifted (see README).", SHIFTS, choices=MODES)
    fill: str = _opt("0", "Fill for --mode pad and embed, in normalised units: a number (0 = the mean colour), R,G,B, or black.", SHIFTS)
    embed_size: int | None = _opt(None, "--mode embed: side in pixels of the downscaled image placed on the fill-coloured view.", SHIFTS)
    subpixel: str | None = _opt(None, "Method for fractional shifts (0..2:0.25): fourier (circular mode) or bilinear (crop, pad, embed).", SHIFTS, choices=SUBPIXEL_METHODS)
    consistency: str | None = _opt(None, "Also measure consistency: top-1 agreement of two views at random offsets, each axis uniform in LO..HI (e.g. -15..16).", SHIFTS, metavar="LO..HI")
    consistency_draws: int = _opt(1, "Random pairs of views per image for --consistency (Zhang 2019 draws 5).", SHIFTS)
    random_shifts: int = _opt(0, "Also draw this many random shifts per image in the span of --shift: the worst case over them (Engstrom 2019: 10), or with --task segmentation the mean pixel agreement (mASSC, Rojas-Gomez 2022: 5); not for embeddings.", SHIFTS)
    # preprocessing
    size: int | None = _opt(None, "View size in pixels (default: the weights' crop size, else 224).", PREPROCESS)
    resize: int | None = _opt(None, "Shorter side after resizing, before cropping (default: the weights', else 256).", PREPROCESS)
    mean: tuple[float, float, float] | None = _opt(None, "Normalisation mean R,G,B (default: the weights', else ImageNet).", PREPROCESS, metavar="R,G,B")
    std: tuple[float, float, float] | None = _opt(None, "Normalisation std R,G,B (default: the weights', else ImageNet).", PREPROCESS, metavar="R,G,B")
    # fixes
    variants: tuple[str, ...] | None = _opt(None, "Variants measured side by side, comma-separated: base, blurpool[:K], blurpool-all[:K], aps, padding:MODE, joined by '+'.", FIXES, metavar="LIST")
    antialias: str | None = _opt(None, "Anti-aliased downsampling as Zhang's released models: blurpool[:K] (K = 2..7, default 4), or blurpool-all[:K] (the stem too).", FIXES)
    aps: bool = _opt(False, "Adaptive polyphase sampling at every stride-2 downsampling.", FIXES)
    padding: str | None = _opt(None, "Padding of every convolution and pool.", FIXES, choices=PADDING_MODES)
    fix_layers: str | None = _opt(None, "Restrict BlurPool and APS to the strided layers matching these names or globs (layer4.*), comma-separated.", FIXES, metavar="GLOBS")
    recalibrate_bn: bool = _opt(False, "Re-estimate each variant's batch-norm statistics on the measured (unshifted) images before measuring (the papers fine-tune instead).", FIXES)
    # how to run
    batch_size: int = _opt(32, "Images per batch, and views per forward pass.", RUN)
    workers: int = _opt(0, "DataLoader worker processes decoding images.", RUN)
    prefetch: bool | None = _opt(None, "With --workers 0, decode the next batch in a background thread while the model runs (default: where a CPU core is free for it, on a GPU or with more cores than torch's threads).", RUN)
    device: str = _opt("cpu", "auto, cpu, cuda, cuda:N or mps.", RUN)
    precision: str = _opt("fp32", "Autocast precision (see README for the error floor).", RUN, choices=PRECISIONS)
    channels_last: bool = _opt(False, "Run model and views in channels-last memory format.", RUN)
    compile: bool = _opt(False, "torch.compile the model before measuring (slow to start, most on the CPU; see README).", RUN)
    compile_metrics: bool = _opt(False, "torch.compile each layer's comparison into fused kernels that read each map once or twice (faster per-layer runs after seconds of compiling; the same definitions to float32 rounding; see README).", RUN)
    cuda_graphs: bool = _opt(True, "On a GPU, capture each full batch's forward passes (the model and the layer comparisons) as CUDA graphs and replay them: one launch per pass, the same numbers (see README).", RUN)

    def __post_init__(self) -> None:
        """Normalise what a notebook or a YAML file may pass in several forms."""
        set_ = object.__setattr__
        set_(self, "data", _strings(self.data))
        set_(self, "label", _strings(self.label))
        set_(self, "mean", _rgb(self.mean, "mean"))
        set_(self, "std", _rgb(self.std, "std"))
        set_(self, "variants", _names(self.variants))
        set_(self, "layer_metrics", _names(self.layer_metrics))
        if isinstance(self.weights, Mapping):
            set_(self, "weights", {str(k): str(v) for k, v in self.weights.items()})
        for name in ("shift", "consistency", "fill", "fix_layers"):  # YAML reads `shift: 5` as a number
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                set_(self, name, ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value))

    def validate(self) -> "MeasureOptions":
        """Check every value that needs no model; return self. Raises ``OptionError`` naming the option."""
        from .engine.shifts import make_shift_set, parse_fill, parse_pair_offsets

        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                hint = did_you_mean(str(value), list(choices))
                raise OptionError(f.name, f"must be one of {', '.join(choices)} (got {value!r}){hint}")
        for name in ("batch_size", "num_images", "size", "resize", "embed_size", "consistency_draws"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise OptionError(name, f"must be a whole number of at least 1 (got {value!r})")
        for name in ("workers", "random_shifts"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise OptionError(name, f"must be 0 or more (got {value!r})")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise OptionError("std", "values must be positive")
        for name in self.layer_metrics or ():
            if name not in LAYER_METRICS:
                raise OptionError("layer_metrics", f"takes {', '.join(LAYER_METRICS)} (got {name!r})"
                                                   f"{did_you_mean(name, list(LAYER_METRICS))}")
        if self.label is not None and len(set(self.label)) != len(self.label):
            raise OptionError("label", f"values must be distinct (got {', '.join(self.label)})")
        device = self.device
        if device not in ("auto", "cpu", "cuda", "mps") and not (device.startswith("cuda:") and device[5:].isdigit()):
            raise OptionError("device", f"must be auto, cpu, cuda, cuda:N or mps (got {device!r})")
        _reword("shift", lambda: make_shift_set(self.shift, self.direction))
        _reword("fill", lambda: parse_fill(self.fill, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)))
        if self.consistency is not None:
            _reword("consistency", lambda: parse_pair_offsets(self.consistency))
        if self.attribution and self.subpixel and (self.subpixel == "fourier") != (self.mode == "circular"):
            raise OptionError("attribution", f"lie differentiates the {'fourier' if self.mode == 'circular' else 'bilinear'} "
                                             f"shift in --mode {self.mode}, not --subpixel {self.subpixel}")
        if self.task is not None:
            check_task(self.task, self.random_shifts, self.consistency is not None, self.subpixel is not None)
        self.variant_specs()
        return self

    def variant_specs(self) -> list[str]:
        """The variants to measure: ``variants`` (default ``base``), each with the fix options added."""
        from .fixes import parse_variant

        extra = [p for p in (self.antialias, "aps" if self.aps else None,
                             f"padding:{self.padding}" if self.padding else None) if p]
        specs = []
        for name in self.variants or ("base",):
            parts = [p for p in name.split("+") if p != "base"] + [p for p in extra if p not in name.split("+")]
            spec = "+".join(parts) or "base"
            _reword("variants", lambda: parse_variant(spec))
            specs.append(spec)
        return list(dict.fromkeys(specs))

    def fix_globs(self) -> list[str]:
        """The ``fix_layers`` patterns as a list (empty: every strided layer)."""
        return [g.strip() for g in (self.fix_layers or "").split(",") if g.strip()]

    def weights_for(self, model: object) -> str:
        """The weights of one model: the same for all, or its entry in a model -> weights mapping
        (a preset pinning what a paper measured; a model it does not name gets ``DEFAULT``)."""
        if isinstance(self.weights, str):
            return self.weights
        return self.weights.get(model, "DEFAULT") if isinstance(model, str) else "DEFAULT"

    def settings(self) -> dict[str, Any]:
        """The options as plain data (lists, not tuples), as recorded in every result file."""
        return {k: list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
                for k, v in asdict(self).items()}

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], source: str = "options") -> "MeasureOptions":
        """Strict: every key must be an option; an unknown key names the closest valid one."""
        known = option_names()
        for key in mapping:
            if key not in known:
                raise UserError(f"{source}: unknown setting {key!r}{did_you_mean(key, known)}")
        return cls(**dict(mapping))

    def updated(self, **changes: Any) -> "MeasureOptions":
        """A copy with some options changed (the object itself is frozen)."""
        return replace(self, **changes)


def check_task(task: str, random_shifts: int, consistency: bool, subpixel: bool) -> None:
    """The random-view options an output kind cannot take: before loading a model when ``--task``
    is given, and again once a model's kind is detected."""
    if consistency and task != "classification":
        raise OptionError("consistency", f"compares top-1 classes: not for --task {task}")
    if random_shifts and task not in ("classification", "segmentation"):
        raise OptionError("random_shifts", f"compares top-1 classes or segmentation maps: not for --task {task}")
    if random_shifts and task == "segmentation" and subpixel:
        raise OptionError("random_shifts", "with --task segmentation draws whole pixels: drop --subpixel")


def _reword(option: str, check: Any) -> Any:
    """Run a parser whose errors are user errors and re-raise them naming ``option`` once (the
    parsers' messages name the flag: ``bad --shift '0..x': ...`` becomes ``shift '0..x': ...``)."""
    try:
        return check()
    except OptionError:
        raise
    except UserError as exc:
        message = str(exc)
        _, named, rest = message.partition(flag(option))
        raise OptionError(option, rest.strip() if named else f"is invalid: {message}") from None


def option_fields() -> list[Field]:
    """The option fields in declaration order (grouped as they read)."""
    return list(fields(MeasureOptions))


def option_names() -> list[str]:
    return [f.name for f in fields(MeasureOptions)]


def base_type(f: Field) -> type:
    """The scalar type of a field (``int`` for ``int | None``, ``str`` for ``tuple[str, ...]``)."""
    hint = typing.get_type_hints(MeasureOptions)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    inner = args[0]
    if typing.get_origin(inner) is tuple:
        item = typing.get_args(inner)[0]
        return str if f.name in ("mean", "std") or item is float else item
    return inner


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def default_text(f: Field) -> str:
    value = f.default if f.default is not MISSING else None
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def flag_reference() -> str:
    """The README's flag table for ``transinv measure``, generated from the options."""
    lines = ["| flag | default | group | what it does |", "|---|---|---|---|"]
    for f in option_fields():
        choices = f.metadata["choices"]
        what = f.metadata["help"] + (f" One of: {', '.join(choices)}." if choices else "")
        shown = f"`{flag_declaration(f)}`" + (" (repeatable)" if f.metadata["repeat"] else "")
        default = default_text(f)
        lines.append(f"| {shown} | {f'`{default}`' if default else ''} | {f.metadata['group']} | {what} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m transinv.options: print the README's flag table
    print(flag_reference())
