"""The ``transinv`` command: parse flags, call the library, render or write the result.

Results go to stdout (a rich table on a terminal, CSV or JSON otherwise); progress, warnings
and errors go to stderr. Bad input ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
import traceback
from contextlib import contextmanager, nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import pandas as pd
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import api, distributed
from .compare import compare_results, summarize
from .errors import UserError
from .plots import plot_results
from .presets import list_presets, load_preset
from .render import print_result
from .results import Result, load_results
from .shifts import DIRECTIONS, MODES

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    help="Measure how far convolutional networks are from translation equivariance and invariance.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


class Format(str, Enum):
    table = "table"
    csv = "csv"
    json = "json"


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, e.g. 0.485,0.456,0.406") from None


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn failures into one line on stderr and an exit code; ``--debug`` shows the traceback."""
    try:
        yield
    except UserError as exc:
        if debug:
            traceback.print_exc()
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as exc:  # anything unforeseen: still one line unless --debug
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"[bold red]error:[/] {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


ProgressStart = Callable[[int, int], Callable[[int], None]]


def _progress_factory(enabled: bool) -> tuple[Progress | None, ProgressStart | None]:
    """A rich progress bar on stderr with images/s, or nothing when disabled."""
    if not enabled:
        return None, None
    progress = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
    )

    def start(total: int, done: int) -> Callable[[int], None]:
        task = progress.add_task("measuring", total=total, completed=done, rate="-")

        def advance(images: int) -> None:
            progress.advance(task, images)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:.1f}" if speed else "-")

        return advance

    return progress, start


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
        print_result(result, Console())
    elif fmt == Format.csv:
        sys.stdout.write(result.to_csv())
    else:
        sys.stdout.write(result.to_json())
    sys.stdout.flush()


def _emit_frame(frame: pd.DataFrame, fmt: Format | None, title: str, shown: pd.DataFrame | None = None) -> None:
    """A table of rows as CSV, JSON records, or a rich table on a terminal (``shown``: the rows
    the terminal table gets, when they differ from the data)."""
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


MODEL_HELP = "torchvision model name, FILE.py:FACTORY, package.module:FACTORY, a TorchScript file or example:NAME."


@app.command()
def measure(
    ctx: typer.Context,
    models: Annotated[list[str], typer.Argument(metavar="MODEL...", help=f"One or more models: {MODEL_HELP}")],
    config: Annotated[Optional[str], typer.Option(help="A preset name (see `transinv presets`) or YAML file; flags given here override it.")] = None,
    weights: Annotated[str, typer.Option(help="DEFAULT, a weights name (IMAGENET1K_V1), none (seeded random init), or a checkpoint path.")] = "DEFAULT",
    data: Annotated[Optional[list[str]], typer.Option(help="Image folder, ImageFolder tree or file; repeat for several. Default: the built-in images.")] = None,
    shift: Annotated[str, typer.Option(help="Shifts in pixels: 0..16, -8..8, 0..32:4, 0,1,2,4,8 or 5. Shift 0 is always the reference.")] = "0..16",
    direction: Annotated[str, typer.Option(help=f"Shift direction: {'|'.join(DIRECTIONS)} (grid = every (dx, dy) pair).")] = "x",
    mode: Annotated[str, typer.Option(help=f"How views are shifted: {'|'.join(MODES)} (see README).")] = "crop",
    fill: Annotated[float, typer.Option(help="Fill value for --mode pad, in normalised units (0 = the mean colour).")] = 0.0,
    subpixel: Annotated[Optional[str], typer.Option(help="Method for fractional shifts (0..2:0.25): fourier (circular mode) or bilinear (crop, pad).")] = None,
    consistency: Annotated[Optional[str], typer.Option(help="Also measure consistency: top-1 agreement of two views at random offsets, each axis uniform in LO..HI (e.g. -16..15).")] = None,
    layers: Annotated[str, typer.Option(help="Layers to measure: default, all, none, or names and globs (layer3.*), comma-separated.")] = "default",
    variants: Annotated[Optional[str], typer.Option(help="Variants measured side by side, comma-separated: base, blurpool[:K], blurpool-all[:K], aps, padding:MODE, joined by '+'.")] = None,
    antialias: Annotated[Optional[str], typer.Option(help="Anti-aliased downsampling as Zhang's released models: blurpool[:K] (K = 2..7, default 4), or blurpool-all[:K] (the stem too).")] = None,
    aps: Annotated[bool, typer.Option("--aps", help="Adaptive polyphase sampling at every stride-2 downsampling.")] = False,
    padding: Annotated[Optional[str], typer.Option(help="Padding of every convolution and pool: zeros, circular, reflect or replicate.")] = None,
    fix_layers: Annotated[Optional[str], typer.Option(help="Restrict BlurPool and APS to the strided layers matching these names or globs (layer4.*), comma-separated.")] = None,
    recalibrate_bn: Annotated[bool, typer.Option("--recalibrate-bn", help="Re-estimate each variant's batch-norm statistics on the measured (unshifted) images before measuring.")] = False,
    size: Annotated[Optional[int], typer.Option(help="View size in pixels (default: the weights' crop size, else 224).")] = None,
    resize: Annotated[Optional[int], typer.Option(help="Shorter side after resizing, before cropping (default: the weights', else 256).")] = None,
    mean: Annotated[Optional[str], typer.Option(help="Normalisation mean R,G,B (default: the weights', else ImageNet).")] = None,
    std: Annotated[Optional[str], typer.Option(help="Normalisation std R,G,B (default: the weights', else ImageNet).")] = None,
    num_images: Annotated[Optional[int], typer.Option(help="Measure a seeded random subset of this many images.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch, and views per forward pass.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for random weights and image sampling.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes decoding images.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
    precision: Annotated[str, typer.Option(help="fp32, bf16 or fp16 (autocast; see README for the error floor).")] = "fp32",
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run model and views in channels-last memory format.")] = False,
    by_correctness: Annotated[bool, typer.Option("--by-correctness", help="Also split top-1 agreement by whether the unshifted prediction was correct.")] = False,
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table, csv or json (default: table on a terminal, CSV otherwise).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write CSV or JSON to this file (by extension unless --format says).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the results to this image file (PNG, PDF, SVG).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar on stderr.")] = True,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Measure output invariance and per-layer equivariance of one or more MODELs over a range of shifts."""
    with _errors(debug):
        context = distributed.from_env()
        bar, start = _progress_factory(progress and err.is_terminal and context.is_main)
        kwargs = dict(
            weights=weights, data=data, shift=shift, direction=direction, mode=mode, fill=fill, subpixel=subpixel,
            consistency=consistency, layers=layers,
            variants=variants, antialias=antialias, aps=aps, padding=padding, fix_layers=fix_layers,
            recalibrate_bn=recalibrate_bn,
            size=size, resize=resize, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
            num_images=num_images, batch_size=batch_size, seed=seed, workers=workers, device=device,
            precision=precision, channels_last=channels_last, by_correctness=by_correctness, progress=start,
        )
        if config is not None:
            for key, value in load_preset(config).items():
                source = ctx.get_parameter_source(key)
                if source is None or source.name == "DEFAULT":
                    kwargs[key] = value
        try:
            with bar if bar is not None else nullcontext():
                result = api.measure(models, **kwargs)
            if config is not None:
                result.settings["config"] = config
            if context.is_main:
                _emit(result, fmt, output)
                if plot is not None:
                    _plot(result.rows, plot)
        finally:
            distributed.shutdown()
        if result.partial:
            if context.is_main:
                err.print(f"interrupted: wrote the {result.summary['images']} images finished so far (partial)")
            raise typer.Exit(EXIT_INTERRUPTED)


def _plot(rows, path: Path, metric: Optional[str] = None, layer: Optional[str] = None) -> None:
    """Draw rows to ``path``; a bad metric or layer name is a one-line error."""
    try:
        panels = plot_results(rows, path, metric=metric, layer=layer)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    err.print(f"wrote {path}: {'; '.join(panels)}", highlight=False, soft_wrap=True)


@app.command("plot")
def plot_command(
    results: Annotated[list[Path], typer.Argument(metavar="RESULTS...", help="CSV or JSON files written by transinv measure.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Image file to write (PNG, PDF, SVG).")],
    metric: Annotated[Optional[str], typer.Option(help="Only this metric.")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Only this layer, drawn against shift.")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Draw saved results: output metrics against shift, layer-by-shift heatmaps, (dx, dy) maps."""
    with _errors(debug):
        try:
            rows = load_results(results)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        _plot(rows, output, metric, layer)


@app.command()
def compare(
    before: Annotated[Path, typer.Argument(metavar="A", help="A result file (CSV or JSON) written by transinv measure.")],
    after: Annotated[Path, typer.Argument(metavar="B", help="The result file to compare with A.")],
    fmt: Annotated[Optional[Format], typer.Option("--format", "-f", help="table (a summary per metric and layer), csv or json (every matched row).")] = None,
    debug: Annotated[bool, typer.Option(help="Show tracebacks.")] = False,
) -> None:
    """Per-metric differences of two saved runs (B minus A), e.g. before and after a change to a model."""
    with _errors(debug):
        try:
            a, b = load_results([before]), load_results([after])
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        label_a, label_b = before.stem, after.stem if after.stem != before.stem else f"{after.stem}-b"
        diff = compare_results(a, b, label_a, label_b)
        summary = summarize(diff)
        same = [c for c in ("model", "variant", "mode") if summary[c].nunique() == 1]
        context = ", ".join(f"{c}={summary[c].iloc[0]}" for c in same)
        _emit_frame(diff, fmt, f"{after} minus {before} ({context})", summary.drop(columns=same))


@app.command()
def presets() -> None:
    """List the presets for published protocols (use one with `transinv measure MODEL --config NAME`)."""
    table = Table(title="presets (configs/)", title_justify="left")
    for column in ("name", "description", "paper"):
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
        frame = api.list_layers(model, weights=weights, size=size)
        _emit_frame(frame, fmt, f"{model}: layers with a spatial map")


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
