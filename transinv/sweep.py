"""Sweeps over many models: expand names and globs, take a shard, measure each model into its own
result file, and resume.

Each model's file is written atomically as soon as it finishes, so killing a sweep (Ctrl-C or
kill -9) loses at most the model in progress. A rerun skips models whose file records the same
settings, measures again those whose settings differ, and retries failed ones.
"""

from __future__ import annotations

import fnmatch
import gc
import hashlib
import json
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import UserError
from .options import MeasureOptions, OptionError

DONE, FAILED, SKIPPED = "done", "failed", "skipped"
FAILED_SUFFIX = ".failed.json"
GLOB = re.compile(r"[*?\[]")
# Options that decide how fast a run goes, not its numbers: a rerun with other values still skips.
RUN_ONLY = ("batch_size", "workers", "prefetch", "cuda_graphs")

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _quiet(message: str) -> None:
    """Warnings of torchrun processes other than rank 0 (rank 0 gives the same ones)."""


def _listable() -> dict[str, object]:
    """The model sources whose names a glob can expand, by prefix (``torchvision``, ``example``, ...)."""
    from .models.registry import sources

    return {source.prefix: source for source in sources() if source.prefix is not None}


def _source_names(source: object) -> list[str]:
    """Every model a source offers, spelled as a model spec (``resnet18``, ``example:constant``)."""
    return source.names("*")  # type: ignore[attr-defined]


def expand_models(patterns: Sequence[str]) -> list[str]:
    """Model specs, in order and each once, from names (kept as given), globs over a source
    (``torchvision:*``, ``example:*``; a bare glob means torchvision) and text files listing
    one name or glob per line (``#`` starts a comment)."""
    out: list[str] = []
    for pattern in patterns:
        path = Path(pattern).expanduser()
        if path.is_file() and path.suffix != ".py" and not zipfile.is_zipfile(path):  # a TorchScript file is a model
            lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
            listed = expand_models([line for line in lines if line]) if any(lines) else []
            if not listed:
                raise UserError(f"{pattern}: lists no models (one name or glob per line)")
            out.extend(listed)
            continue
        listable = _listable()
        source, colon, name = pattern.partition(":")
        if not colon or source not in listable:
            if not GLOB.search(pattern):
                out.append(pattern)  # a name, FILE.py:FACTORY, module:factory or TorchScript file
                continue
            if colon and "/" not in source and "." not in source:
                raise UserError(f"{pattern}: no model source {source!r} (sources: {', '.join(listable)})")
            source, name = "torchvision", pattern
        names = _source_names(listable[source])
        bare = [n.removeprefix(f"{source}:") for n in names]
        found = [n for n, b in zip(names, bare) if fnmatch.fnmatchcase(b, name)]
        if not found:
            raise UserError(f"{pattern}: matches no {source} model")
        out.extend(found)
    return list(dict.fromkeys(out))


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N: this job takes every N-th model from the I-th
    (counting from 0, as ``SLURM_ARRAY_TASK_ID`` with ``--array=0-3`` and Kubernetes'
    ``JOB_COMPLETION_INDEX`` do)."""
    index, slash, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise UserError(f"--shard {text}: write I/N, e.g. 0/4 (the first of 4 shards)") from None
    if not slash or n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: I/N needs 0 <= I < N (shards count from 0), e.g. 0/4 .. 3/4")
    return i, n


def file_stem(spec: str) -> str:
    """The name of a model's result file: the spec with every character other than letters,
    digits, ``.``, ``_`` and ``-`` written as ``_`` (no leading dot: those are temporary files)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", spec).lstrip(".") or "_"


def measured_settings(options: MeasureOptions) -> dict[str, Any]:
    """The options that decide the numbers (all but ``RUN_ONLY``), as compared on resume."""
    return {k: v for k, v in options.settings().items() if k not in RUN_ONLY}


def settings_hash(options: MeasureOptions) -> str:
    """A short digest of ``measured_settings``: equal digests, same numbers."""
    text = json.dumps(measured_settings(options), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_record(path: Path) -> dict[str, Any] | None:
    """A sweep file's document (None when absent or not a sweep file, e.g. edited by hand)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("sweep"), dict) else None


def result_files(directory: Path) -> list[Path]:
    """The sweep files of a directory, in name order; ``.NAME.json.*`` leftovers of a killed
    atomic write are not among them."""
    return sorted(p for p in directory.glob("*.json") if not p.name.startswith("."))


@dataclass
class Outcome:
    """What happened to one model in this run; ``note``: the failure, or why it was measured again."""

    model: str
    status: str
    path: Path
    seconds: float | None = None
    note: str | None = None


@dataclass
class SweepReport:
    """Every model's outcome; ``interrupted``: the model in progress when Ctrl-C came (not recorded)."""

    outcomes: list[Outcome] = field(default_factory=list)
    interrupted: str | None = None

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def plan_files(specs: Sequence[str], directory: Path) -> dict[str, Path]:
    """Each model's result file; two specs that would share a file are an error."""
    paths: dict[str, Path] = {}
    owners: dict[str, str] = {}
    for spec in specs:
        stem = file_stem(spec)
        if stem in owners:
            raise UserError(f"models {owners[stem]!r} and {spec!r} would share the result file {stem}.json: rename one")
        owners[stem] = spec
        paths[spec] = directory / f"{stem}.json"
    return paths


def _why_measure(path: Path, spec: str, options: MeasureOptions, digest: str) -> str | None:
    """None when ``path`` holds this model done with these settings; else why it is measured
    ('' for a first time)."""
    failed = read_record(path.with_name(path.stem + FAILED_SUFFIX))
    doc = read_record(path)
    if doc is None or doc["sweep"].get("status") != DONE:
        if failed is not None:
            return f"failed before ({failed['sweep'].get('reason', 'no reason recorded')}); trying again"
        return "its file is unreadable; measuring again" if path.exists() else ""
    record = doc["sweep"]
    if record.get("model") != spec:
        return f"its file holds another model ({record.get('model')}); measuring again"
    if record.get("settings_hash") == digest:
        return None
    recorded = record.get("options", {})
    changed = [f"{k}: {recorded.get(k)} -> {v}" for k, v in measured_settings(options).items() if recorded.get(k) != v]
    return f"settings differ from its file ({'; '.join(changed) or 'an older settings record'}); measuring again"


def _one_line(exc: BaseException) -> str:
    """A failure as one line: a user error's message, else the exception type and its first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserError) else f"{type(exc).__name__}: {text}".rstrip(": ")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _replace(path: Path, text: str, other: Path) -> None:
    """Write ``path`` atomically, then remove the model's other file (done vs failed), so each
    model has one file (a kill between the two leaves both; readers prefer the done file)."""
    from .reports.results import write_atomic

    write_atomic(path, text)
    other.unlink(missing_ok=True)


def measure_one(spec: str, path: Path, options: MeasureOptions, config: str | None, progress: Any,
                warn: Log, write: bool = True) -> Outcome | None:
    """Measure one model into ``path`` (or record its failure beside it); None when interrupted.
    ``write`` False: a torchrun process other than rank 0, which takes part and writes nothing."""
    from . import api
    from .reports.results import json_text

    record = {"model": spec, "settings_hash": settings_hash(options), "config": config,
              "options": measured_settings(options)}
    failed_path = path.with_name(path.stem + FAILED_SUFFIX)
    start = time.perf_counter()
    try:
        result = api.measure(spec, options, progress=progress, warn=lambda m: warn(f"{spec}: {m}"))
    except KeyboardInterrupt:
        return None
    except Exception as exc:  # cannot be built, no weights, out of memory: recorded, and the sweep goes on
        seconds = time.perf_counter() - start
        reason = _one_line(exc)
        del exc
        _free_memory()
        if write:
            doc = {"sweep": {**record, "status": FAILED, "reason": reason, "seconds": seconds, "finished": _now()}}
            _replace(failed_path, json_text(doc), path)
        return Outcome(spec, FAILED, failed_path, seconds, reason)
    if result.partial:
        return None
    seconds = time.perf_counter() - start
    if config is not None:
        result.settings["config"] = config
    if write:
        doc = {"sweep": {**record, "status": DONE, "seconds": seconds, "finished": _now()}, **result.to_dict()}
        _replace(path, json_text(doc), failed_path)
    return Outcome(spec, DONE, path, seconds)


def _free_memory() -> None:
    """After a failure (out of memory, most often), hand the model's memory back before the next."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_sweep(
    models: Sequence[str], options: MeasureOptions, directory: str | Path, *, config: str | None = None,
    shard: str | None = None, progress: Any = None, log: Log = _stderr, warn: Log = _stderr,
) -> SweepReport:
    """Measure every model (names, globs or list files; ``shard`` ``I/N``: every N-th from the
    I-th) into ``directory``, one file each, skipping models done with the same settings.

    ``progress``: a ``SweepProgress`` (two bars), or None. ``log`` gets one line per model.
    Under torchrun every process measures each model together and only rank 0 writes files.
    """
    from .engine import distributed
    from .engine.runner import resolve_device

    options = options.validate()
    if options.label is not None:
        raise OptionError("label", "names one model: a sweep labels each model by its name")
    specs = expand_models(models)
    if shard is not None:
        index, count = parse_shard(shard)
        specs = specs[index::count]
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file: a sweep writes a directory of result files")
    paths = plan_files(specs, directory)
    digest = settings_hash(options)
    context = distributed.from_env()
    report = SweepReport()
    todo = []
    for spec in specs:
        why = _why_measure(paths[spec], spec, options, digest)
        if why is None:
            report.outcomes.append(Outcome(spec, SKIPPED, paths[spec]))
        else:
            todo.append((spec, why))
    main = context.is_main
    if main:
        directory.mkdir(parents=True, exist_ok=True)
        skipped = report.count(SKIPPED)
        log(f"sweep: {len(specs)} models{f' (shard {shard})' if shard else ''}, {skipped} done already, "
            f"{len(todo)} to measure, into {directory}")
    if progress is not None:
        progress.start(len(todo))
    device = resolve_device(options.device, context.local_rank if context.active else None)
    with distributed.session(context, device):
        for number, (spec, why) in enumerate(todo, 1):
            if main and why:
                log(f"{spec}: {why}")
            if progress is not None:
                progress.model(spec)
            outcome = measure_one(spec, paths[spec], options, config, progress, warn if main else _quiet, write=main)
            if outcome is None:
                report.interrupted = spec
                break
            report.outcomes.append(outcome)
            if progress is not None:
                progress.model_done()
            if main:
                log(_progress_line(outcome, number, len(todo), report))
    return report


def _progress_line(outcome: Outcome, number: int, total: int, report: SweepReport) -> str:
    """'[3/12] resnet18: done in 4.2 s, about 38 s left' (one line per model, for logs without a bar)."""
    from .progress import time_left

    measured = [o for o in report.outcomes if o.status != SKIPPED]
    left = time_left(sum(o.seconds or 0.0 for o in measured), len(measured), total)
    what = f"done in {outcome.seconds:.1f} s" if outcome.status == DONE else f"FAILED ({outcome.note})"
    return f"[{number}/{total}] {outcome.model}: {what}" + (f", about {left} left" if left and number < total else "")
