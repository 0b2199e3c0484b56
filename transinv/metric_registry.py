"""The one list of metrics: name, where it applies, how its interval is made, and what it means.

The runner, the statistics, the tables, the plots, ``compare`` and the README's metric table all
read ``METRICS``; adding a metric is one ``MetricSpec`` here plus the code that computes its
per-image values. Importing this module costs nothing (no torch), so the CLI can list metrics fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Scope = Literal["layer", "output", "set"]
Kind = Literal["proportion", "mean"]

OUTPUT_LAYER = "output"  # the ``layer`` value of output and whole-set rows


@dataclass(frozen=True)
class MetricSpec:
    """What a metric is: ``scope`` layer (per layer and shift), output (per shift) or set (one value
    over the whole shift set); ``kind`` proportion (0/1 per image, Wilson interval) or mean
    (bootstrap interval); ``bounds`` the range of its values (None: unbounded); ``better`` the
    direction of improvement; ``definition`` one line, as the README states it; ``at_reference``
    the value every image has at shift 0 by definition (such rows carry no interval)."""

    name: str
    scope: Scope
    kind: Kind
    better: Literal["higher", "lower"]
    definition: str
    needs_labels: bool = False
    bounds: tuple[float, float] | None = (0.0, 1.0)
    by_correctness: bool = False  # only with --by-correctness (a split of another metric)
    at_reference: float | None = None  # its value at shift 0 by definition (None: not fixed, or no shift)
    attribution: bool = False  # only with --attribution lie; shift columns hold the direction of an infinitesimal shift
    task: str = "classification"  # output and set metrics: the output kind they read (``--task``)
    random_draws: bool = False  # only with --random-shifts (read from each image's random draws)


TOP1_AGREEMENT = "top1_agreement"
KL_DIVERGENCE = "kl_divergence"
PROB_CHANGE = "prob_change"
ACCURACY = "accuracy"
TOP1_AGREEMENT_IF_CORRECT = "top1_agreement_if_correct"
TOP1_AGREEMENT_IF_WRONG = "top1_agreement_if_wrong"
WORST_CASE_ACCURACY = "worst_case_accuracy"
WORST_CASE_AGREEMENT = "worst_case_agreement"
WORST_CASE_ACCURACY_INTEGER = "worst_case_accuracy_integer"
WORST_CASE_ACCURACY_FRACTIONAL = "worst_case_accuracy_fractional"
WORST_CASE_AGREEMENT_INTEGER = "worst_case_agreement_integer"
WORST_CASE_AGREEMENT_FRACTIONAL = "worst_case_agreement_fractional"
RANDOM_WORST_CASE_ACCURACY = "random_worst_case_accuracy"
RANDOM_WORST_CASE_AGREEMENT = "random_worst_case_agreement"
JAGGEDNESS = "jaggedness"
PATH_PROB_CHANGE = "path_prob_change"
CONSISTENCY = "consistency"
CONSISTENCY_IF_CORRECT = "consistency_if_correct"
CONSISTENCY_IF_WRONG = "consistency_if_wrong"
COSINE_DISTANCE = "cosine_distance"
EMBEDDING_CHANGE = "embedding_change"
NN_AGREEMENT = "nn_agreement"
PIXEL_AGREEMENT = "pixel_agreement"
PIXEL_KL_DIVERGENCE = "pixel_kl_divergence"
SEGMENTATION_CONSISTENCY = "segmentation_consistency"
RANDOM_SEGMENTATION_CONSISTENCY = "random_segmentation_consistency"
EQUIVARIANCE_ERROR = "equivariance_error"
POOLED_INVARIANCE_ERROR = "pooled_invariance_error"
LIE_DERIVATIVE = "lie_derivative"
LIE_CONTRIBUTION = "lie_contribution"
LIE_UNATTRIBUTED = "lie_unattributed"
EQUIVARIANCE_ERROR_RESAMPLED = "equivariance_error_resampled"
EQUIVARIANCE_ERROR_INTERIOR = "equivariance_error_interior"
INPLACE_CHANGE = "inplace_change"

_SPECS = (
    MetricSpec(EQUIVARIANCE_ERROR, "layer", "mean", "lower",
               "`‖f_l(T_d x) − T_k f_l(x)‖₂ / ‖f_l(x)‖₂`, `k = d / s_l`, both norms on the region present in both "
               "maps; only where `s_l` divides `dx` and `dy` (`aligned`)", bounds=(0.0, float("inf")), at_reference=0.0),
    MetricSpec(EQUIVARIANCE_ERROR_RESAMPLED, "layer", "mean", "lower",
               "`equivariance_error` where `s_l` does not divide the shift: `T_k` with the fractional `k = d / s_l` is "
               "the band-limited circular Fourier shift of `f_l(x)`, and `‖T_k f_l(x)‖₂` the denominator; crop, pad "
               "and embed modes compare on the overlap shrunk by one pixel on every side (its own rows: never mixed "
               "with the exact ones)", bounds=(0.0, float("inf"))),
    MetricSpec(EQUIVARIANCE_ERROR_INTERIOR, "layer", "mean", "lower",
               "`equivariance_error` on the positions at least `m_l` feature pixels from the border in both "
               "`f_l(T_d x)` and `T_k f_l(x)`, `m_l` the layer's padding margin (measured, see below); aligned shifts "
               "only; NaN (not counted) when no position is left", bounds=(0.0, float("inf")), at_reference=0.0),
    MetricSpec(INPLACE_CHANGE, "layer", "mean", "lower",
               "`‖f_l(T_d x) − f_l(x)‖₂ / ‖f_l(x)‖₂` on the whole map, no realignment: how much the map changes in "
               "place; every shift", bounds=(0.0, float("inf")), at_reference=0.0),
    MetricSpec(POOLED_INVARIANCE_ERROR, "layer", "mean", "lower",
               "`‖g_l(T_d x) − g_l(x)‖₂ / ‖g_l(x)‖₂`, `g_l` = per-channel mean over all positions; every shift",
               bounds=(0.0, float("inf")), at_reference=0.0),
    MetricSpec(TOP1_AGREEMENT, "output", "proportion", "higher", "`1[c(T_d x) = c(x)]`; 1 at `d = 0`",
               at_reference=1.0),
    MetricSpec(KL_DIVERGENCE, "output", "mean", "lower",
               "`KL(p(x) ‖ p(T_d x)) = Σ_k p_k(x) (log p_k(x) − log p_k(T_d x))`, natural log",
               bounds=(0.0, float("inf")), at_reference=0.0),
    MetricSpec(PROB_CHANGE, "output", "mean", "lower",
               "`|p(T_d x)[c(x)] − p(x)[c(x)]|`: change of the confidence in the unshifted prediction",
               at_reference=0.0),
    MetricSpec(ACCURACY, "output", "proportion", "higher", "`1[c(T_d x) = y]`", needs_labels=True),
    MetricSpec(TOP1_AGREEMENT_IF_CORRECT, "output", "proportion", "higher",
               "`top1_agreement` over the images whose unshifted prediction is right (`--by-correctness`)",
               needs_labels=True, by_correctness=True, at_reference=1.0),
    MetricSpec(TOP1_AGREEMENT_IF_WRONG, "output", "proportion", "higher",
               "`top1_agreement` over the images whose unshifted prediction is wrong (`--by-correctness`)",
               needs_labels=True, by_correctness=True, at_reference=1.0),
    MetricSpec(WORST_CASE_AGREEMENT, "set", "proportion", "higher",
               "`1[c(T_d x) = c(x) for every d in the shift set]`; only when the set has a shift besides 0"),
    MetricSpec(WORST_CASE_ACCURACY, "set", "proportion", "higher",
               "`1[c(T_d x) = y for every d in the shift set, 0 included]` (worst-of-k over the set); only when the "
               "set has a shift besides 0",
               needs_labels=True),
    MetricSpec(WORST_CASE_AGREEMENT_INTEGER, "set", "proportion", "higher",
               "`worst_case_agreement` over the whole-pixel shifts of the set (only when it also holds fractional ones)"),
    MetricSpec(WORST_CASE_ACCURACY_INTEGER, "set", "proportion", "higher",
               "`worst_case_accuracy` over the whole-pixel shifts of the set (only when it also holds fractional ones)",
               needs_labels=True),
    MetricSpec(WORST_CASE_AGREEMENT_FRACTIONAL, "set", "proportion", "higher",
               "`worst_case_agreement` over shift 0 and the fractional shifts (Michaeli et al. 2023 report the two apart)"),
    MetricSpec(WORST_CASE_ACCURACY_FRACTIONAL, "set", "proportion", "higher",
               "`worst_case_accuracy` over shift 0 and the fractional shifts", needs_labels=True),
    MetricSpec(RANDOM_WORST_CASE_AGREEMENT, "set", "proportion", "higher",
               "`1[c(T_{r_k} x) = c(x) for k = 1..K]`, `K = --random-shifts`, each `r_k` drawn per image, each axis "
               "uniform between the smallest and largest shift of that axis in `--shift` (whole pixels; real values "
               "with `--subpixel`) (Engstrom et al. 2019's worst of 10)", random_draws=True),
    MetricSpec(RANDOM_WORST_CASE_ACCURACY, "set", "proportion", "higher",
               "`1[c(x) = y and c(T_{r_k} x) = y for k = 1..K]`, the same draws", needs_labels=True,
               random_draws=True),
    MetricSpec(JAGGEDNESS, "set", "mean", "lower",
               "share of consecutive steps `d_i → d_{i+1}` of the path (shifts sorted by `dx + dy`, along `--direction "
               "x`, `y` or `diagonal`) where `c` changes (Azulay & Weiss 2019's \"P(top-1 change)\"); two shifts or more"),
    MetricSpec(PATH_PROB_CHANGE, "set", "mean", "lower",
               "mean over the same steps of `|p(T_{d_{i+1}} x)[c_i] − p(T_{d_i} x)[c_i]|`, `c_i = c(T_{d_i} x)` (Azulay "
               "& Weiss's \"mean absolute change\"; unlike `prob_change`, against the previous step, not the "
               "unshifted view)"),
    MetricSpec(CONSISTENCY, "set", "proportion", "higher",
               "`1[c(T_{d1} x) = c(T_{d2} x)]`, `d1`, `d2` drawn per image, each axis uniform in `--consistency "
               "LO..HI` (Zhang 2019); with `--consistency-draws D`, the share of an image's `D` pairs that agree"),
    MetricSpec(CONSISTENCY_IF_CORRECT, "set", "proportion", "higher",
               "`consistency` over the images whose unshifted prediction is right (`--by-correctness`)",
               needs_labels=True, by_correctness=True),
    MetricSpec(CONSISTENCY_IF_WRONG, "set", "proportion", "higher",
               "`consistency` over the images whose unshifted prediction is wrong (`--by-correctness`)",
               needs_labels=True, by_correctness=True),
    MetricSpec(LIE_DERIVATIVE, "output", "mean", "lower",
               "`‖L p(x)‖₂`, `L p = d/dt p(T_{t·v} x)` at `t = 0`: `p` the softmax probabilities, `v` the direction "
               "in `shift_x`, `shift_y` (input pixels per unit `t`); the band-limited derivative in circular mode, "
               "the central difference of the bilinear shift otherwise (`--attribution lie`)",
               bounds=(0.0, float("inf")), attribution=True),
    MetricSpec(LIE_CONTRIBUTION, "layer", "mean", "lower",
               "`c_l = ⟨J_{>l} e_l, L p⟩ / ‖L p‖`, signed: `e_l = d/dt T_{-t·v/s_l} f_l(T_{t·v/s_in} h)` is leaf layer "
               "`l`'s own Lie derivative at its input `h`, `J_{>l}` the Jacobian of the rest of the network; per image "
               "`Σ_l c_l + lie_unattributed = lie_derivative` (0 where `L p = 0`)",
               bounds=None, attribution=True),
    MetricSpec(LIE_UNATTRIBUTED, "output", "mean", "lower",
               "`‖L p‖ − Σ_l c_l`: the part made outside leaf modules (functional ops in `forward`, such as "
               "`torch.flatten` of a spatial map); 0 up to rounding where leaf modules hold every op that is not "
               "exactly equivariant (torchvision ResNets, `nn.Sequential` CNNs)",
               bounds=None, attribution=True),
    MetricSpec(COSINE_DISTANCE, "output", "mean", "lower",
               "`1 − cos(e(x), e(T_d x))` of the embeddings `e` (`--task embedding`)", bounds=(0.0, 2.0),
               at_reference=0.0, task="embedding"),
    MetricSpec(EMBEDDING_CHANGE, "output", "mean", "lower",
               "`‖e(T_d x) − e(x)‖₂ / ‖e(x)‖₂` (`--task embedding`)", bounds=(0.0, float("inf")),
               at_reference=0.0, task="embedding"),
    MetricSpec(NN_AGREEMENT, "output", "proportion", "higher",
               "`1[cos(e(T_d x), e(x)) > cos(e(T_d x), e(x')) for every other image x' of the measured set]`: the "
               "shifted view retrieves its own unshifted image among all the run's images (all processes under "
               "torchrun); a tie fails (`--task embedding`)", task="embedding"),
    MetricSpec(PIXEL_AGREEMENT, "output", "mean", "higher",
               "share of the pixels `p` present in both views with `argmax_k s(T_d x)[k, p + d] = argmax_k s(x)[k, p]` "
               "(segmentation scores `s`, wrapped under `--mode circular`); Rojas-Gomez et al. 2022's mASSC at one "
               "shift (`--task segmentation`)", at_reference=1.0, task="segmentation"),
    MetricSpec(PIXEL_KL_DIVERGENCE, "output", "mean", "lower",
               "mean over the same pixels of `KL(softmax s(x)[:, p] ‖ softmax s(T_d x)[:, p + d])`, natural log "
               "(`--task segmentation`)", bounds=(0.0, float("inf")), at_reference=0.0, task="segmentation"),
    MetricSpec(SEGMENTATION_CONSISTENCY, "set", "mean", "higher",
               "mean of `pixel_agreement` over the set's shifts besides 0 (every chosen shift, not Rojas-Gomez et "
               "al.'s random draws: see `random_segmentation_consistency`); only when the set has a shift besides 0",
               task="segmentation"),
    MetricSpec(RANDOM_SEGMENTATION_CONSISTENCY, "set", "mean", "higher",
               "`(1/K) Σ_k pixel_agreement(r_k)`, `K = --random-shifts`, each `r_k` drawn per image, each axis uniform "
               "in whole pixels between the smallest and largest shift of that axis in `--shift`: Rojas-Gomez et al. "
               "2022's mASSC (their protocol: `--shift -32,32 --direction grid --random-shifts 5`; `--mode circular` "
               "for their circular score, `--mode pad` for their linear one; `--task segmentation`)",
               task="segmentation", random_draws=True),
)

METRICS: dict[str, MetricSpec] = {spec.name: spec for spec in _SPECS}
# the per-layer metrics the hooks compute on every shifted pass (``--layer-metrics`` picks among them)
LAYER_METRICS: tuple[str, ...] = tuple(s.name for s in _SPECS if s.scope == "layer" and not s.attribution)


def spec(name: str) -> MetricSpec | None:
    """The registered metric of this name (None for a name from a newer or foreign file)."""
    return METRICS.get(name)


def names(scope: Scope | None = None) -> list[str]:
    """Metric names in display order, optionally of one scope."""
    return [s.name for s in _SPECS if scope is None or s.scope == scope]


def is_proportion(name: str) -> bool:
    """True for 0/1-per-image metrics: a Wilson interval, and a fixed 0..1 axis in plots.
    Unknown names count as means."""
    found = METRICS.get(name)
    return found is not None and found.kind == "proportion"


def fixed_at_reference(name: str) -> bool:
    """True for metrics whose value at shift 0 is fixed by definition (no interval there)."""
    found = METRICS.get(name)
    return found is not None and found.at_reference is not None


def value_bounds(name: str) -> tuple[float, float]:
    """The range a metric's values (and so its interval) cannot leave; unbounded when unknown."""
    found = METRICS.get(name)
    return found.bounds if found is not None and found.bounds is not None else (float("-inf"), float("inf"))


def order(metric_names: list[str]) -> list[str]:
    """``metric_names`` in registry order, unknown names last in their given order."""
    position = {name: i for i, name in enumerate(METRICS)}
    return sorted(dict.fromkeys(metric_names), key=lambda n: position.get(n, len(position)))


def markdown_table() -> str:
    """The README's metric table, generated so it cannot drift from the registry."""
    lines = ["| metric | per image | scope | interval | better | labels |", "|---|---|---|---|---|---|"]
    for s in _SPECS:
        where = {"layer": "layer `l`, per shift", "output": "output, per shift", "set": "output, one row per run"}[s.scope]
        where = where.replace("shift", "direction") if s.attribution else where
        interval = "Wilson" if s.kind == "proportion" else "bootstrap"
        definition = s.definition.replace("|", "\\|")  # a pipe inside a table cell
        lines.append(f"| `{s.name}` | {definition} | {where} | {interval} | {s.better} "
                     f"| {'needed' if s.needs_labels else ''} |")
    return "\n".join(lines)
