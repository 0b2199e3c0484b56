"""Hugging Face ``transformers`` image classifiers and image encoders: ``hf:ORG/NAME`` (a hub id) or
``hf:/path/to/dir`` (a ``save_pretrained`` folder), also written ``transformers:``, with the
preprocessing of their image processor. A checkpoint whose architecture is not an image classifier
(``Dinov2Model``, ``ViTModel``, ``CLIPModel``'s image tower, ...) is measured as an embedding model.
transformers is an optional extra (``pip install 'transinv[hf]'``); hub code is never run."""

from __future__ import annotations

import fnmatch
from dataclasses import replace
import json
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import UserError
from .checkpoints import checkpoint_path, load_checkpoint, no_such_file
from .extras import hf_cache_dir, hf_repo_dir, honour_offline, offline, require
from .outputs import CLASSIFICATION, EMBEDDING
from .loaded import DEFAULT_RESIZE, DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD, LoadedModel, default_preprocess, interpolation, resize_for_crop

if TYPE_CHECKING:
    from ..engine.data import Preprocess

PREFIX = "hf"
ALIAS = "transformers"
DETECTION = "ForObjectDetection"
CLASSIFIER = "ForImageClassification"
# multimodal models: the class of their image tower and the output field that is its embedding
TOWERS = {"clip": ("CLIPVisionModelWithProjection", "image_embeds"), "siglip": ("SiglipVisionModel", "pooler_output")}


def _transformers() -> ModuleType:
    return require("transformers", "hf", "Hugging Face transformers models")


def _is_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).expanduser().exists()


def _config(transformers: ModuleType, spec: str) -> Any:
    """The model's ``AutoConfig``: from a folder, or from the hub cache (downloading only when allowed)."""
    if _is_path(spec):
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise no_such_file("model folder", folder, ())
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder} has no config.json: save the model there with save_pretrained()")
        return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    try:
        return transformers.AutoConfig.from_pretrained(spec, cache_dir=str(hf_cache_dir()), local_files_only=offline())
    except OSError as exc:  # missing file, offline, unknown repository
        why = "cannot be downloaded (offline)" if offline() else f"could not be downloaded ({type(exc).__name__})"
        raise UserError(f"hf:{spec}: its config.json is not in the local cache ({hf_repo_dir(spec)}) and {why}: "
                        "download it once online, or pass the folder save_pretrained() wrote as hf:/path/to/dir") from exc


def _is_classifier(spec: str, config: Any) -> bool:
    """True for an image classifier, False for an image encoder (its architecture is not a
    classifier, or a vision model with no classifier class); detection and non-image models are
    one line each."""
    from transformers.models.auto import modeling_auto

    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type in modeling_auto.MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES or any(DETECTION in a for a in architectures):
        raise UserError(f"hf:{spec}: detection models are not supported yet (transinv measures image classifiers "
                        "and encoders)")
    classifiable = config.model_type in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    if any(a.endswith(CLASSIFIER) for a in architectures) or (classifiable and not architectures):
        return True
    if config.model_type in TOWERS or (hasattr(config, "num_channels") and config.model_type in modeling_auto.MODEL_MAPPING_NAMES):
        return False
    raise UserError(f"hf:{spec}: a {config.model_type!r} model is neither an image classifier nor an image encoder "
                    "in transformers: transinv measures images")


def _size(sizes: Any, key: str) -> int | None:
    """One entry of a processor's ``size``/``crop_size`` (a dict, or transformers 5's ``SizeDict``)."""
    value = sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)
    return int(value) if value else None


def _preprocess(transformers: ModuleType, label: str, source: str, cache: dict[str, Any]) -> tuple[Preprocess, list[str], bool]:
    """The preprocessing of the model's image processor (resize, crop, filter, mean/std), notes where
    transinv's differs, and whether it had to be guessed (no processor saved with the model)."""
    from ..engine.data import Preprocess

    try:
        proc = transformers.AutoImageProcessor.from_pretrained(source, **cache)
    except (OSError, ValueError, KeyError):  # no preprocessor_config.json, or one transformers cannot read
        return default_preprocess(), [], True
    sizes = getattr(proc, "size", None) or {}
    edge, height, width = (_size(sizes, k) for k in ("shortest_edge", "height", "width"))
    notes = []
    if edge is None and height is None:
        return default_preprocess(), [f"{label}: its image processor gives no size transinv can read ({sizes})"], True
    side = edge or height or 0
    crop_pct = getattr(proc, "crop_pct", None)
    crop = _size(getattr(proc, "crop_size", None) or {}, "height") if getattr(proc, "do_center_crop", False) else None
    if crop_pct and edge is not None and edge < 384:  # ConvNeXt's rule: shorter side to edge / crop_pct, then crop edge
        resize, size = resize_for_crop(edge, crop_pct), edge
    else:
        resize, size = side, crop or side
    if edge is None or (crop_pct and edge >= 384):
        notes.append(f"{label}: its processor resizes images to {height or side}x{width or side} (squashing them); "
                     f"transinv resizes the shorter side to {resize} and centre-crops {size}")
    if getattr(proc, "do_rescale", True) and abs(getattr(proc, "rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        notes.append(f"{label}: its processor rescales pixels by {proc.rescale_factor}; transinv uses 1/255")
    normalise = getattr(proc, "do_normalize", True)
    mean = tuple(proc.image_mean) if normalise and getattr(proc, "image_mean", None) else (IMAGENET_MEAN if normalise else (0.0,) * 3)
    std = tuple(proc.image_std) if normalise and getattr(proc, "image_std", None) else (IMAGENET_STD if normalise else (1.0,) * 3)
    mode, note = interpolation(label, getattr(proc, "resample", 2))
    notes += [note] if note else []
    return Preprocess(resize, size, mean, std, mode), notes, False


def _tower_config(config: Any) -> Any:
    """The config the image tower is built from: a multimodal model's ``vision_config`` (with the
    model's projection size), else the config itself."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        return config
    if hasattr(config, "projection_dim"):
        vision.projection_dim = config.projection_dim
    return vision


@contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """No "Loading weights" progress bar on stderr, where transinv draws its own, and no load report
    (an image tower leaves its model's text weights unused by design)."""
    logging = transformers.utils.logging
    shown, verbosity = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if shown:
            logging.enable_progress_bar()


def _cached_image_models() -> list[str]:
    """Hub ids of image models in the Hugging Face cache: their config.json names a
    ``...ForImageClassification`` class, a multimodal model with an image tower, or an encoder
    (a ``...Model`` class) of images (``num_channels``)."""
    found = set()
    for config in hf_cache_dir().glob("models--*/snapshots/*/config.json"):
        try:
            settings = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        architectures = settings.get("architectures") or []
        encoder = "num_channels" in settings and any(a.endswith("Model") for a in architectures)
        if any(CLASSIFIER in a for a in architectures) or settings.get("model_type") in TOWERS or encoder:
            found.add(config.parents[2].name.removeprefix("models--").replace("--", "/"))
    return sorted(found)


class HuggingFaceSource:
    """transformers' image classifiers (``AutoModelForImageClassification``) and image encoders
    (``AutoModel``'s ``pooler_output``, CLIP's and SigLIP's image towers); the label is the
    repository's or folder's name."""

    name = "hf"
    prefix = PREFIX
    aliases = (ALIAS,)
    hint = "hf:ORG/NAME or hf:/path/to/dir (pip install 'transinv[hf]')"

    def claims(self, spec: str) -> bool:
        return False  # only ever named with its prefix

    def names(self, pattern: str = "*", pretrained: bool = False) -> list[str]:
        _transformers()
        found = [f"{PREFIX}:{n}" for n in _cached_image_models()]
        return [n for n in found if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n.removeprefix(f"{PREFIX}:"), pattern)]

    def load(self, spec: str, weights: str, seed: int) -> LoadedModel:
        import torch

        transformers = _transformers()
        honour_offline()
        checkpoint = checkpoint_path(weights)
        if checkpoint is None and weights.lower() not in ("none", "default"):
            raise UserError(f"--weights {weights}: transformers models take DEFAULT (their own), none or a checkpoint path")
        config = _config(transformers, spec)
        classifier = _is_classifier(spec, config)
        local = _is_path(spec)
        source = str(Path(spec).expanduser()) if local else spec
        cache: dict[str, Any] = {"local_files_only": True} if local else {"cache_dir": str(hf_cache_dir()), "local_files_only": offline()}
        tower, field = TOWERS.get(config.model_type, ("AutoModel", "pooler_output"))
        auto = transformers.AutoModelForImageClassification if classifier else getattr(transformers, tower)
        torch.manual_seed(seed)
        if checkpoint is None and weights.lower() == "default":
            try:
                with _quiet(transformers):
                    own = {} if classifier else {"config": _tower_config(config)}  # a tower: its own config
                    module = auto.from_pretrained(source, **own, **cache)
            except OSError as exc:
                where = source if local else hf_repo_dir(spec)
                raise UserError(f"hf:{spec}: its weights are not in {where} and cannot be loaded: "
                                "download them once online, or measure with --weights none") from exc
        else:
            built = config if classifier else _tower_config(config)
            module = auto.from_config(built) if hasattr(auto, "from_config") else auto(built)  # Auto* or a class
            if checkpoint is not None:  # the checkpoint of the transformers model itself
                load_checkpoint(module, checkpoint)
        if not classifier:
            from .hf_embedding import ImageEmbedding

            module = ImageEmbedding(module, field)
        label = Path(source).name if local else spec.rsplit("/", 1)[-1]
        preprocess, notes, guessed = _preprocess(transformers, label, source, cache)
        side = getattr(_tower_config(config), "image_size", None)
        if guessed and isinstance(side, int) and side != preprocess.size:  # no processor: the model's own size
            preprocess = replace(preprocess, size=side, resize=resize_for_crop(side, DEFAULT_SIZE / DEFAULT_RESIZE))
        resolved = "pretrained" if checkpoint is None and weights.lower() == "default" else weights
        return LoadedModel(spec, resolved, module, preprocess, label=label, notes=notes,
                           preprocess_guessed=guessed or checkpoint is not None,
                           output=CLASSIFICATION.name if classifier else EMBEDDING.name)
