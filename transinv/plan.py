"""What a run will measure, decided before anything runs: models and their labels, variants,
shift plans, and this process's share of the images.

``make_plan`` builds the models (weights loaded, no forward pass) and groups every (model,
variant) job by what decides its views (preprocessing and shift plan), so each group decodes its
images once. Layers are chosen later, from a probe pass of each transformed model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import Sequence

from torch import nn

from .engine.data import ImageItem, Preprocess, find_images, select_images
from .engine.distributed import Context
from .errors import UserError, WeightsUnavailable
from .models import LoadedModel, load_model, unique_labels, wrap_module
from .options import MeasureOptions
from .engine.shifts import ShiftPlan, make_shift_set, parse_fill, parse_pair_offsets

ModelSpec = str | nn.Module


@dataclass(frozen=True)
class Job:
    """One (model, variant) pair to measure; ``label`` names its rows."""

    model: LoadedModel
    label: str
    variant: str


@dataclass
class Group:
    """Jobs measured on the same decoded canvases and views."""

    preprocess: Preprocess
    shifts: ShiftPlan
    jobs: list[Job] = field(default_factory=list)


@dataclass
class Plan:
    """The whole run: groups of jobs, the images this process measures (``ids``: their positions
    in the whole run, which seed per-image randomness) and all the run's images."""

    groups: list[Group]
    items: list[ImageItem]
    ids: list[int]
    images: list[ImageItem]  # every image of the run, all processes included
    labelled: bool

    @property
    def jobs(self) -> list[Job]:
        return [job for group in self.groups for job in group.jobs]


def prepare_model(model: ModelSpec, options: MeasureOptions) -> LoadedModel:
    """Load a model spec (or take a copy of a notebook's module, which is never changed) and
    settle its preprocessing: the weights' own, overridden by the options."""
    if isinstance(model, nn.Module):
        loaded = wrap_module(copy.deepcopy(model))
    elif options.weights_for(model) == "auto":
        try:
            loaded = load_model(model, "DEFAULT", options.seed)
        except WeightsUnavailable:
            loaded = load_model(model, "none", options.seed)
            loaded.notes.append(f"{loaded.label}: no pretrained weights here (not cached, no download): measuring "
                                "random weights, whose predictions mean little (see README, Weights)")
    else:
        loaded = load_model(model, options.weights_for(model), options.seed)
    pre = loaded.preprocess
    size = options.size or pre.size
    if size != pre.size and loaded.set_size is not None and loaded.source != "module":  # a notebook's: as built
        loaded.set_size(loaded.module, size)
        loaded.notes.append(f"{loaded.label}: built for {pre.size} px inputs, rebuilt for {size} px (timm's set_input_size: "
                            "position embeddings resampled; a windowed model's windows follow the patch grid)")
    resize = options.resize or (max(pre.resize, size) if options.size else pre.resize)
    if options.size and not options.resize and size != pre.size:
        framed = max(size, round(size * pre.resize / pre.size))
        loaded.notes.append(f"{loaded.label}: --size {size} views the centre {size} px of each image resized to "
                            f"{resize} px; --resize {framed} keeps the weights' framing ({pre.resize} -> {pre.size})")
    given = {name for name in ("size", "resize", "mean", "std") if getattr(options, name) is not None}
    settled = replace(pre, size=size, resize=resize, mean=options.mean or pre.mean, std=options.std or pre.std)
    return loaded.with_preprocess(settled, given)


def labels_for(models: Sequence[LoadedModel], given: Sequence[str] | None) -> list[str]:
    """Row labels: ``given`` (the ``label`` option, one per model), else the models' short,
    unique labels (see ``unique_labels``)."""
    if given is None:
        return unique_labels(models)
    if len(given) != len(models):
        raise UserError(f"label: give one label per model ({len(models)} models, {len(given)} labels)")
    return list(given)


def make_plan(models: Sequence[ModelSpec], options: MeasureOptions, context: Context) -> Plan:
    """Build the models and group the jobs; no forward pass runs."""
    if not models:
        raise UserError("name at least one model")
    shifts = tuple(make_shift_set(options.shift, options.direction))
    pairs = parse_pair_offsets(options.consistency) if options.consistency else None
    variants = options.variant_specs()
    loaded = [prepare_model(spec, options) for spec in models]
    groups: dict[tuple[Preprocess, ShiftPlan], Group] = {}
    for model, label in zip(loaded, labels_for(loaded, options.label)):
        pre = model.preprocess
        plan = ShiftPlan(shifts, pre.size, options.mode, parse_fill(options.fill, pre.mean, pre.std), options.subpixel,
                         pairs, options.consistency_draws, options.random_shifts, options.embed_size)
        plan.check(pre.resize)
        group = groups.setdefault((pre, plan), Group(pre, plan))
        group.jobs.extend(Job(model, label, variant) for variant in variants)
    everything = select_images(find_images(options.data), options.num_images, options.sample_seed)
    return Plan(
        groups=list(groups.values()),
        items=context.shard(everything),
        images=everything,
        ids=context.shard(range(len(everything))),
        labelled=any(item.label >= 0 for item in everything),
    )
