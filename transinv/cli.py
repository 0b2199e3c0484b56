"""The ``transinv`` command: parse flags, call the library, render or write the result.

Results go to stdout (a rich table on a terminal, CSV or JSON otherwise); progress, warnings
and errors go to stderr. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import inspect
import sys
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import Field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UserError
from .options import WHAT, MeasureOptions, OptionError, base_type, flag, flag_declaration, option_fields

if TYPE_CHECKING:  # the heavy modules (torch, pandas) load only when a command needs them
    import pandas as pd
    from rich.progress import Progress

    from .reports.results import Result

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    help="Measure how far image networks (CNNs and vision transformers) are from translation equivariance and invariance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


@contextmanager
def _errors(debug: bool, crash_code: int = 1) -> Iterator[None]:
    """Turn failures into one line on stderr and an exit code; ``--debug`` shows the traceback.
    ``crash_code``: the exit code of an unforeseen error (``check`` keeps 1 for a failed bound)."""
    try:
        yield
    except UserError as exc:
        if debug:
            traceback.print_exc()
        message = exc.as_flag() if isinstance(exc, OptionError) else str(exc)
        err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # anything unforeseen: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(crash_code) from None


def _emit(result: Result, fmt: Format | None, output: Optional[Path]) -> None:
    """Write the result where and how the user asked; a terminal gets a table, a pipe CSV.

    With ``-o``, the file gets CSV or JSON (``--format``, else its extension) and stdout still
    gets the table when it is a terminal or ``--format table`` was asked for.
    """
    if output is not None:
        file_fmt = fmt if fmt in (Format.csv, Format.json) else (Format.json if output.suffix == ".json" else Format.csv)
        (result.to_json if file_fmt == Format.json else result.to_csv)(output)
        err.print(f"wrote {output}", highlight=False)
        if fmt != Format.table and (fmt is not None or not sys.stdout.isatty()):
            return
        fmt = Format.table
    if fmt is None:
        fmt = Format.table if sys.stdout.isatty() else Format.csv
    if fmt == Format.table:
        from .reports.render import print_result

        print_result(result, Console())
    elif fmt == Format.csv:
        sys.stdout.write(result.to_csv())
    else:
        sys.stdout.write(result.to_json())
    sys.stdout.flush()


def _emit_frame(frame: pd.DataFrame, fmt: Format | None, title: str, shown: pd.DataFrame | None = None) -> None:
    """A table of rows as CSV, JSON records, or a rich table on a terminal (``shown``: the rows
    the terminal table gets, when they differ from the data)."""
    import pandas as pd

    if fmt is None:
        fmt = Format.table if sys.stdout.isatty() else Format.csv
    if fmt == Format.csv:
        sys.stdout.write(frame.to_csv(index=False))
    elif fmt == Format.json:
        sys.stdout.write(frame.to_json(orient="records", indent=2) + "\n")
    else:
        shown = frame if shown is None else shown
        table = Table(title=escape(title), title_justify="left")
        for column in shown.columns:
            numeric = pd.api.types.is_numeric_dtype(shown[column]) and not pd.api.types.is_bool_dtype(shown[column])
            table.add_column(escape(str(column)), justify="right" if numeric else "left")
        for row in shown.itertuples(index=False):
            table.add_row(*[_cell(v) for v in row])
        Console().print(table)


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


MODEL_HELP = ("torchvision model name, FILE.py:FACTORY, package.module:FACTORY, a TorchScript file, example:NAME, "
              "timm:NAME, hf-hub:ORG/NAME, hf:ORG/NAME (transformers) or a .onnx file.")
LABEL_HELP = ("Legend label of a series: OLD=NEW (OLD a model, or model/variant as the plot names it), repeatable; "
              "or one bare label per series, in order.")
FIGSIZE_HELP = "Figure size W,H in inches (default: what the panels need)."
DPI_HELP = "Figure resolution in pixels per inch (default 110)."


def _option_parameter(f: Field) -> inspect.Parameter:
    """The typer parameter of one ``MeasureOptions`` field: flag, help, panel and type from the field."""
    meta = f.metadata
    scalar: Any = base_type(f)  # choices stay strings: MeasureOptions.validate names a bad one, with "did you mean"
    metavar = meta["metavar"] or ("[" + "|".join(meta["choices"]) + "]" if meta["choices"] else None)
    if meta["repeat"]:
        annotation: Any = Optional[list[scalar]]
    elif scalar is bool:
        annotation = Optional[bool] if f.default is None else bool
    else:
        annotation = Optional[scalar] if f.default is None else scalar
    default = f.default
    info = typer.Option(flag_declaration(f), help=meta["help"], rich_help_panel=meta["group"], metavar=metavar,
                        show_default=default not in (None, False))
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, info])


_OUTPUT_PANEL = "Output"
_MEASURE_EXTRA = [
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help="A preset name (see `transinv presets`) or YAML file; flags given here override it.",
                                    rich_help_panel=WHAT)]),
    inspect.Parameter("fmt", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Format], typer.Option("--format", "-f", help="table, csv or json (default: table on a terminal, CSV otherwise).",
                                       rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("output", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write CSV or JSON to this file (by extension unless --format says).",
                                     rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("plot", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option(help="Also draw the results to this image file (PNG, PDF, SVG).", rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("title", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help="Figure title. With --plot.", rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("figsize", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[str], typer.Option(help=FIGSIZE_HELP + " With --plot.", rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("dpi", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[int], typer.Option(help=DPI_HELP + " With --plot.", rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("progress", inspect.Parameter.KEYWORD_ONLY, default=True, annotation=Annotated[
        bool, typer.Option(help="Show a progress bar on stderr.", rich_help_panel=_OUTPUT_PANEL)]),
    inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option(help="Show tracebacks.", rich_help_panel=_OUTPUT_PANEL)]),
]


def _measure(ctx: typer.Context, models: list[str], **given: Any) -> None:
    """Measure output invariance and per-layer equivariance of one or more MODELs over a range of shifts."""
    cli_only = {p.name: given.pop(p.name) for p in _MEASURE_EXTRA}
    with _errors(cli_only["debug"]):
        from . import api
        from .engine import distributed

        style = _style(None, cli_only["title"], cli_only["figsize"], cli_only["dpi"])
        if style and cli_only["plot"] is None:
            raise UserError("--title, --figsize and --dpi style the figure: add --plot FIGURE.png")
        options = _build_options(ctx, given, cli_only["config"])
        from .progress import ConsoleProgress

        context = distributed.from_env()
        shown = cli_only["progress"] and err.is_terminal and context.is_main
        with ConsoleProgress(err) if shown else nullcontext() as bar:
            result = api.measure(models, options, progress=bar)
        if cli_only["config"] is not None:
            result.settings["config"] = cli_only["config"]
        if context.is_main:
            _emit(result, cli_only["fmt"], cli_only["output"])
            if cli_only["plot"] is not None:
                _plot(result.rows, cli_only["plot"], **style)
        if result.partial:
            if context.is_main:
                err.print(f"interrupted: wrote the {result.summary['images']} images finished so far (partial)")
            raise typer.Exit(EXIT_INTERRUPTED)


def _build_options(ctx: typer.Context, given: dict[str, Any], config: str | None) -> MeasureOptions:
    """The options from the generated flags and a preset; flags the user typed win over the preset."""
    from .presets import load_preset

    preset: dict[str, Any] = {}
    if config is not None:
        preset = load_preset(config)
        for key in list(preset):
            source = ctx.get_parameter_source(key)
            if source is not None and source.name != "DEFAULT":
                preset.pop(key)
    return MeasureOptions(**{**given, **preset}).validate()


_measure.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
     inspect.Parameter("models", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
         list[str], typer.Argument(metavar="MODEL...", help=f"One or more models: {MODEL_HELP}")])]
    + [_MEASURE_EXTRA[0]] + [_option_parameter(f) for f in option_fields()] + _MEASURE_EXTRA[1:]
)
app.command("measure")(_measure)


def _plot(rows: pd.DataFrame, path: Path, metric: Optional[str] = None, layer: Optional[str] = None, **style: object) -> None:
    """Draw rows to ``path``; a bad metric, layer or label is a one-line error."""
    from .reports.plots import plot_results

    try:
        panels = plot_results(rows, path, metric=metric, layer=layer, **style)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    err.print(f"wrote {path}: {'; '.join(panels)}", highlight=False, soft_wrap=True)


def _style(label: Optional[list[str]], title: Optional[str], figsize: Optional[str], dpi: Optional[int]) -> dict:
    """The figure's style flags as ``plot_results`` keywords, checked before any work."""
    from .reports.plots import plot_style

    try:
        return plot_style(label, title, figsize, dpi)
    except ValueError as exc:
        raise UserError(str(exc)) from exc


@app.command("plot")
def plot_command(
    results: Annotated[list[Path], typer.Argument(metavar="RESULTS...", help="CSV or JSON files written by transinv measure.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file to write (PNG, PDF, SVG).")],
    metric: Annotated[Optional[str], typer.Option(help="Only this metric.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Only this layer, drawn against shift.")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help=LABEL_HELP)] = None,
    title: Annotated[Optional[str], typer.Option(help="Figure title.")] = None,
    figsize: Annotated[Optional[str], typer.Option(help=FIGSIZE_HELP)] = None,
    dpi: Annotated[Optional[int], typer.Option(help=DPI_HELP)] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Draw saved results: output metrics against shift, layer-by-shift heatmaps, (dx, dy) maps."""
    with _errors(debug):
        from .reports.results import load_results

        style = _style(label, title, figsize, dpi)
        try:
            rows = load_results(results)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        _plot(rows, output, metric, layer, **style)


SHOW_OPTIONS = ("weights", "variants", "antialias", "aps", "padding", "mode", "fill", "embed_size", "subpixel",
                "size", "resize", "mean", "std", "seed", "device")  # the measure options that decide a picture
_SHOW_EXTRA = {
    "shift": (str, typer.Option(help="The shift in pixels: dx, or dx,dy (e.g. 3 or 2,-1).", rich_help_panel="How to shift")),
    "layer": (str, typer.Option(help="all (each layer measure measures by default: their error maps in forward order), "
                                     "a layer name (its maps in detail), or names and globs, comma-separated.",
                                rich_help_panel=WHAT)),
    "output": (Path, typer.Option("--output", "-o", help="Image file to write (PNG, PDF, SVG).", rich_help_panel=_OUTPUT_PANEL)),
    "channels": (int, typer.Option(help="Channels of largest energy drawn for one layer.", rich_help_panel=_OUTPUT_PANEL)),
    "title": (Optional[str], typer.Option(help="Figure title.", rich_help_panel=_OUTPUT_PANEL)),
    "dpi": (Optional[int], typer.Option(help=DPI_HELP, rich_help_panel=_OUTPUT_PANEL)),
    "fmt": (Optional[Format], typer.Option("--format", "-f", help="table, csv or json for the per-layer numbers on stdout "
                                                                  "(default: table on a terminal, CSV otherwise).",
                                           rich_help_panel=_OUTPUT_PANEL)),
    "debug": (bool, typer.Option(help="Show tracebacks.", rich_help_panel=_OUTPUT_PANEL)),
}
_SHOW_DEFAULTS = {"layer": "all", "channels": 4, "title": None, "dpi": None, "fmt": None, "debug": False}


def _show(model: str, image: Path, **given: Any) -> None:
    """Draw one image's shifted view through MODEL: its layers' maps and error maps.

    The figure shows the two views, a layer's maps for both, the reference map moved by d/s and the
    error map; with several layers, each one's error map. Each layer's numbers for this image go to
    stdout."""
    extra = {name: given.pop(name) for name in _SHOW_EXTRA}
    with _errors(extra["debug"]):
        from .reports.show import show

        options = MeasureOptions(**given)
        shown = show(model, image, extra["output"], extra["shift"], extra["layer"], options,
                     channels=extra["channels"], title=extra["title"], dpi=extra["dpi"])
        err.print(f"wrote {extra['output']}", highlight=False)
        rows = shown.rows()
        screen = rows[["variant", "layer", "stride", "equivariance_error", "error_map_mean"]].astype(object)
        screen["equivariance_error"] = screen["equivariance_error"].where(rows["aligned"], "not aligned")
        top1 = "; ".join(f"{v.variant}: {v.predictions[0][2]} -> {v.predictions[1][2]}" for v in shown.variants)
        _emit_frame(rows, extra["fmt"], f"{shown.model}, {shown.image.name}, shift {shown.shift}, mode {shown.mode} "
                    f"(top-1 {top1})", screen)


def _extra_parameter(name: str) -> inspect.Parameter:
    annotation, info = _SHOW_EXTRA[name]
    default = _SHOW_DEFAULTS.get(name, inspect.Parameter.empty)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[annotation, info])


_show.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
        str, typer.Argument(metavar="MODEL", help=MODEL_HELP)]),
     inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
         Path, typer.Argument(metavar="IMAGE", help="An image file.")])]
    + [_extra_parameter(n) for n in ("shift", "layer", "output")]
    + [_option_parameter(f) for f in option_fields() if f.name in SHOW_OPTIONS]
    + [_extra_parameter(n) for n in ("channels", "title", "dpi", "fmt", "debug")]
)
app.command("show")(_show)


@app.command()
def flips(
    result: Annotated[Path, typer.Argument(metavar="RESULT", help="A per-image CSV written by transinv measure --per-image.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file to write (PNG, PDF, SVG).")],
    top: Annotated[int, typer.Option(help="How many images the sheet shows (and stdout lists).")] = 12,
    title: Annotated[Optional[str], typer.Option(help="Figure title.")] = None,
    dpi: Annotated[Optional[int], typer.Option(help=DPI_HELP)] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table, csv or json for the ranking on stdout.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Draw the images whose top-1 class flips at the smallest shift (from a --per-image file).

    Each image is named with its shift and its two classes; the ranking goes to stdout."""
    with _errors(debug):
        from .reports.flips import plot_flips

        try:
            ranked = plot_flips(result, output, top, title=title, dpi=dpi)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        err.print(f"wrote {output}: {len(ranked)} images", highlight=False)
        _emit_frame(ranked, fmt, f"images that flip most easily ({result})")


@app.command()
def compare(
    before: Annotated[Path, typer.Argument(metavar="A", help="A result file (JSON for paired intervals; CSV works without) written by transinv measure.")],
    after: Annotated[Optional[Path], typer.Argument(metavar="[B]", help="The result file to compare with A; without it, each variant in A is compared with base and each model with the first.")] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table (a summary per metric and layer), csv or json (every matched row).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Differences B minus A, with paired 95% intervals: two saved runs, or the variants and models of one."""
    with _errors(debug):
        from .reports.compare import compare_runs, compare_within, summarize
        from .reports.render import comparison_tables
        from .reports.results import read_result

        try:
            a = read_result(before)
            b = None if after is None else read_result(after)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        if b is None:
            label_a, label_b = "a", "b"
            comparison = compare_within(a)
        else:
            label_a, label_b = before.stem, after.stem if after.stem != before.stem else f"{after.stem}-b"
            comparison = compare_runs(a, b, label_a, label_b)
        if comparison.note:
            err.print(f"warning: {comparison.note}", highlight=False, soft_wrap=True)
        if fmt == Format.table or (fmt is None and sys.stdout.isatty()):
            Console().print(*comparison_tables(summarize(comparison), label_a, label_b, files=after is not None))
        else:
            _emit_frame(comparison.rows, fmt, "")


@app.command()
def presets() -> None:
    """List the presets for published protocols (use one with `transinv measure MODEL --config NAME`)."""
    from .presets import list_presets

    table = Table(title="presets", title_justify="left")
    table.add_column("name", no_wrap=True, overflow="fold")  # the name is what a user copies: never cut
    for column in ("description", "paper"):
        table.add_column(column)
    for preset in list_presets():
        table.add_row(preset["name"], escape(preset["description"]), escape(preset["paper"]))
    Console().print(table)


@app.command()
def layers(
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    weights: Annotated[str, typer.Option(help="none (default here: shapes do not depend on weights), DEFAULT, a weights name or a checkpoint.")] = "none",
    size: Annotated[Optional[int], typer.Option(help="Input size the shapes and strides are measured at (default 224).")] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table, csv or json.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """List MODEL's measurable layers in forward order: output shape, cumulative stride, default selection."""
    with _errors(debug):
        from . import api

        frame = api.list_layers(model, weights=weights, size=size)
        _emit_frame(frame, fmt, f"{model}: layers with a spatial map")


_EXTRA = {p.name: p for p in _MEASURE_EXTRA}  # --config, --progress and --debug, shared by the commands below
EXIT_FAILED = 1


def _keyword(name: str, annotation: Any, default: Any = None) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _model_arguments(metavar: str, help: str, many: bool) -> list[inspect.Parameter]:
    return [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
            inspect.Parameter("models" if many else "model", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[
                list[str] if many else str, typer.Argument(metavar=metavar, help=help)])]


_SWEEP_EXTRA = [
    _keyword("results_dir", Annotated[Path, typer.Option(
        "--output", "-o", metavar="RESULTS_DIR", help="Directory of result files, one per model (created if needed).",
        rich_help_panel=_OUTPUT_PANEL)], ...),
    _keyword("shard", Annotated[Optional[str], typer.Option(
        metavar="I/N", help="Measure every N-th model from the I-th (I counts from 0), e.g. $SLURM_ARRAY_TASK_ID/4.",
        rich_help_panel=WHAT)]),
    _EXTRA["progress"], _EXTRA["debug"],
]


def _sweep(ctx: typer.Context, models: list[str], **given: Any) -> None:
    """Measure many models, each into its own file in RESULTS_DIR as soon as it finishes.

    A rerun skips models done with the same settings and retries failed ones."""
    cli_only = {name: given.pop(name) for name in ("config", "results_dir", "shard", "progress", "debug")}
    with _errors(cli_only["debug"]):
        from .engine import distributed
        from .progress import SweepProgress
        from .sweep import FAILED, run_sweep

        options = _build_options(ctx, given, cli_only["config"])
        main = distributed.from_env().is_main  # under torchrun, rank 0 speaks for all
        shown = cli_only["progress"] and err.is_terminal and main
        log = lambda message: err.print(escape(message), highlight=False, soft_wrap=True) if main else None  # noqa: E731
        with SweepProgress(err) if shown else nullcontext() as bar:
            report = run_sweep(models, options, cli_only["results_dir"], config=cli_only["config"],
                               shard=cli_only["shard"], progress=bar, log=log, warn=lambda m: log(f"warning: {m}"))
        failed = [o for o in report.outcomes if o.status == FAILED]
        measured = len(report.outcomes) - report.count("skipped") - len(failed)
        log(f"sweep: {measured} measured, {report.count('skipped')} done already, {len(failed)} failed"
            + (f" ({', '.join(o.model for o in failed)})" if failed else ""))
        if report.interrupted is not None:
            log(f"interrupted: {report.interrupted} was not recorded; rerun the same command to go on")
            raise typer.Exit(EXIT_INTERRUPTED)
        if failed:
            raise typer.Exit(EXIT_FAILED)


_sweep.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _model_arguments("MODEL...", "Model names, globs over a source ('torchvision:*', 'example:*'; a bare glob means "
                     f"torchvision) or text files with one per line. A model is: {MODEL_HELP}", many=True)
    + [_EXTRA["config"]] + [_option_parameter(f) for f in option_fields()] + _SWEEP_EXTRA
)
app.command("sweep")(_sweep)


@app.command("leaderboard")
def leaderboard_command(
    results_dir: Annotated[Path, typer.Argument(metavar="RESULTS_DIR", help="The -o directory of transinv sweep (shards' directories merged are one).")],
    metric: Annotated[Optional[str], typer.Option(help="Rank by this output or whole-set metric (default: the preset's headline).")] = None,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table, csv or json (default: table on a terminal, CSV otherwise).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the table to this CSV or JSON file (by extension).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Draw one labelled point per model to this image file (PNG, PDF, SVG).")] = None,
    x: Annotated[Optional[str], typer.Option(help="The plot's x column (default: accuracy, or parameters without labels).")] = None,
    y: Annotated[Optional[str], typer.Option(help="The plot's y column (default: the headline metric).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Rank the models of a sweep: one row each, its headline metric with its interval.

    Columns: parameters, accuracy, the headline metric with its interval, worst cases, the layer
    where the error is born, run time."""
    with _errors(debug):
        from . import metric_registry as R
        from .reports.leaderboard import leaderboard, plot_leaderboard, shown
        from .reports.results import write_atomic

        frame, headline = leaderboard(results_dir, metric, warn=lambda m: err.print(f"warning: {escape(m)}", highlight=False))
        if output is not None:
            as_json = output.suffix.lower() == ".json"
            write_atomic(output, frame.to_json(orient="records", indent=2) + "\n" if as_json else frame.to_csv(index=False))
            err.print(f"wrote {output}", highlight=False)
        where = " at the largest shift" if R.METRICS[headline].scope == "output" else ""
        _emit_frame(frame, fmt, f"{results_dir}: ranked by {headline}{where}", shown(frame, headline))
        if plot is not None:
            try:
                drawn = plot_leaderboard(frame, plot, x, y, headline)
            except ValueError as exc:
                raise UserError(str(exc)) from exc
            err.print(f"wrote {plot}: {drawn}", highlight=False, soft_wrap=True)


_CHECK_EXTRA = [
    _keyword("at_most", Annotated[Optional[list[str]], typer.Option(
        "--max", metavar="METRIC[@LAYER][:SHIFT]=VALUE", help="Fail when a matching row is above VALUE; repeatable.",
        rich_help_panel="Bounds")]),
    _keyword("at_least", Annotated[Optional[list[str]], typer.Option(
        "--min", metavar="METRIC[@LAYER][:SHIFT]=VALUE", help="Fail when a matching row is below VALUE; repeatable.",
        rich_help_panel="Bounds")]),
    _keyword("output", Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Also write the measured rows to this CSV or JSON file.", rich_help_panel=_OUTPUT_PANEL)]),
    _EXTRA["progress"], _EXTRA["debug"],
]


def _check(ctx: typer.Context, model: str, **given: Any) -> None:
    """Measure MODEL and check bounds on its metrics (exit 0: all hold, 1: one fails, 2: bad input).

    A failing bound is one line each; a bound the run cannot check is bad input."""
    cli_only = {name: given.pop(name) for name in ("config", "at_most", "at_least", "output", "progress", "debug")}
    with _errors(cli_only["debug"], crash_code=EXIT_USAGE):
        from .gates import check, parse_bounds

        bounds = parse_bounds(cli_only["at_most"], cli_only["at_least"])  # before torch loads: a typo costs no run
        from . import api
        from .engine import distributed
        from .progress import ConsoleProgress

        options = _build_options(ctx, given, cli_only["config"])
        context = distributed.from_env()
        shown = cli_only["progress"] and err.is_terminal and context.is_main
        with ConsoleProgress(err) if shown else nullcontext() as bar:
            result = api.measure(model, options, progress=bar)
        if result.partial:
            err.print("interrupted: nothing was checked")
            raise typer.Exit(EXIT_INTERRUPTED)
        if not context.is_main:
            return
        if cli_only["output"] is not None:
            _emit(result, None, cli_only["output"])
        verdicts = check(bounds, result.rows)
        for verdict in verdicts:
            print(verdict.line())
        failed = sum(not v.passed for v in verdicts)
        err.print(f"{failed} of {len(verdicts)} bounds failed" if failed else f"all {len(verdicts)} bounds hold",
                  highlight=False)
        if failed:
            raise typer.Exit(EXIT_FAILED)


_check.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    _model_arguments("MODEL", f"The model to check: {MODEL_HELP}", many=False)
    + [_EXTRA["config"]] + [_option_parameter(f) for f in option_fields()] + _CHECK_EXTRA
)
app.command("check")(_check)


@app.command()
def models(
    pattern: Annotated[str, typer.Argument(help="Glob over names, with or without the source's prefix: '*convnext*'.")] = "*",
    source: Annotated[Optional[str], typer.Option(help="Only this source: torchvision, example, timm, hf.")] = None,
    pretrained: Annotated[bool, typer.Option(help="Only models with pretrained weights.")] = False,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table, csv or json.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """List the models each source can load by name (files and factories are not listed)."""
    with _errors(debug):
        import pandas as pd

        from .models import list_models

        rows = list_models(pattern, source, pretrained, skipped=lambda line: err.print(f"note: {escape(line)}", highlight=False, soft_wrap=True))
        if not rows:
            raise UserError(f"no model names match {pattern!r}" + (f" in {source}" if source else ""))
        frame = pd.DataFrame(rows, columns=["source", "name", "pretrained"])
        _emit_frame(frame, fmt, f"models matching {pattern}")


def main() -> None:
    """Console-script entry: usage errors become one line on stderr with exit code 2."""
    try:
        code = app(standalone_mode=False)  # returns the exit code of a typer.Exit
        if isinstance(code, int):
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        message = getattr(exc, "format_message", None)
        if message is None:
            raise
        err.print(f"[bold red]error:[/] {message()} (see transinv --help)", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", EXIT_USAGE))
