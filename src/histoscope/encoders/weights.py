"""Finding, reading, checking and loading tile-encoder weights.

``weights`` is one of: ``None`` (the spec's Hugging Face repo, through the local HF
cache; ``HF_HOME``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` are honoured by
huggingface_hub), a file (``.safetensors``, ``.bin``, ``.pth``, ``.pt``; optionally
written ``file:PATH``), a folder holding one of the spec's filenames (e.g. a
downloaded Hub snapshot), or ``"random"`` -- the only way to get an untrained model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from huggingface_hub import get_token, hf_hub_download
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from torch import nn

from histoscope.encoders.convert import convert_checkpoint
from histoscope.encoders.errors import (
    CorruptWeightsError,
    WeightsAccessError,
    WeightsMismatchError,
    WeightsNotFoundError,
)
from histoscope.encoders.registry import TileEncoderSpec
from histoscope.io.checkpoint import CheckpointError, compare_state_dict, read_checkpoint

__all__ = [
    "RANDOM",
    "clean_state_dict",
    "download_from_hub",
    "load_weights",
    "read_weights",
    "resolve_weights",
    "sha256_file",
]

RANDOM = "random"
_STRIP_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_FIX = ("Fix: log in with `hf auth login` (or `huggingface-cli login`) or set the HF_TOKEN environment "
        "variable; or download the weights yourself and pass them as weights=PATH (`--weights PATH`).")


def resolve_weights(spec: TileEncoderSpec, weights: str | Path | None, *,
                    token: str | bool | None = None) -> Path | None:
    """The local weights file for ``spec`` (downloading it if needed); None for ``"random"``."""
    if weights == RANDOM:
        return None
    if weights is None:
        if spec.hf_repo is None:
            where = f" (see {spec.homepage})" if spec.homepage else ""
            raise WeightsNotFoundError(
                f"the weights of tile encoder '{spec.name}' are not on the Hugging Face Hub; download "
                f"{' or '.join(spec.hf_filenames)} from the authors{where} and pass weights=PATH (`--weights PATH`)."
            )
        return download_from_hub(spec.hf_repo, spec.hf_filenames, encoder=spec.name, gated=spec.gated, token=token)
    path = Path(str(weights).removeprefix("file:")).expanduser()
    if path.is_dir():
        for filename in spec.hf_filenames:
            if (path / filename).is_file():
                return path / filename
        found = sorted(p.name for p in path.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))
        raise WeightsNotFoundError(
            f"{path}: folder has none of {', '.join(spec.hf_filenames)} (the weight files of '{spec.name}'); "
            f"weight-like files present: {', '.join(found) or 'none'}. Pass the file itself as weights=PATH."
        )
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weights file not found (for tile encoder '{spec.name}').")
    return path


def download_from_hub(repo: str, filenames: tuple[str, ...], *, encoder: str, gated: bool,
                      token: str | bool | None = None) -> Path:
    """The first of ``filenames`` that ``repo`` has, via ``hf_hub_download`` (cache first when offline)."""
    not_cached, not_in_repo = [], []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, token=token))
        except GatedRepoError as err:
            raise _access_error(encoder, repo, gated=True, reason="access to this gated repo was refused") from err
        except RepositoryNotFoundError as err:
            reason = "the repo was not found, or it is gated/private and needs an authorised token"
            raise _access_error(encoder, repo, gated=gated, reason=reason) from err
        except LocalEntryNotFoundError:
            not_cached.append(filename)  # offline (or Hub unreachable) and not in the cache
        except EntryNotFoundError:
            not_in_repo.append(filename)
        except HfHubHTTPError as err:
            raise _access_error(encoder, repo, gated=gated, reason=f"the Hub answered {err}") from err
    if not_cached:
        offline = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        reason = (f"{', '.join(not_cached)} not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) "
                  f"and {offline}")
        raise _access_error(encoder, repo, gated=gated, reason=reason)
    raise WeightsNotFoundError(
        f"Hugging Face repo '{repo}' has none of {', '.join(not_in_repo)} (weights of tile encoder '{encoder}'); "
        "pass the weights file as weights=PATH (`--weights PATH`)."
    )


def _access_error(encoder: str, repo: str, *, gated: bool, reason: str) -> WeightsAccessError:
    lines = [f"cannot get the weights of tile encoder '{encoder}' from Hugging Face repo '{repo}': {reason}."]
    if gated:
        lines.append(f"'{repo}' is a gated repo: accept its terms at https://huggingface.co/{repo} with the "
                     "account whose token you use.")
    if get_token() is None:
        lines.append("No Hugging Face token was found.")
    lines.append(_FIX)
    return WeightsAccessError("\n".join(lines))


def sha256_file(path: str | Path) -> str:
    """SHA-256 hex digest of a file, streamed."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_weights(path: str | Path) -> object:
    """The object stored in a weights file (safetensors or ``torch.save``), read by the
    project's one checkpoint reader; an unreadable file raises :class:`CorruptWeightsError`."""
    try:
        return read_checkpoint(path, kind="weights")
    except CheckpointError as err:
        raise CorruptWeightsError(err.path, err.reason) from err


def clean_state_dict(obj: object, *, unwrap: tuple[str, ...],
                     path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Unwrap container keys (``state_dict``, ``model``, ...) and strip wrapper prefixes."""
    for key in unwrap:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CorruptWeightsError(path or "state dict", f"expected a state dict, found {type(obj).__name__}")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CorruptWeightsError(
            path or "state dict",
            f"not a state dict: {', '.join(map(str, not_tensors[:10]))} are not tensors "
            f"(top-level keys: {', '.join(map(str, list(obj)[:10]))})")
    out = {}
    for key, value in obj.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], spec: TileEncoderSpec, *,
                 path: str | Path | None = None, hint: Callable[[], str | None] | None = None) -> None:
    """Convert a clean state dict from ``spec.checkpoint_format`` and load it strictly into ``model``.

    ``hint`` is called only on a mismatch, to suggest what the checkpoint is instead.
    """
    converted, foreign = convert_checkpoint(spec.checkpoint_format, state_dict, model)
    missing, unexpected, mismatched = compare_state_dict(model, converted)
    unexpected = foreign + unexpected
    if missing or unexpected or mismatched:
        source = f" ({spec.hf_repo})" if spec.hf_repo else ""
        raise WeightsMismatchError(
            path=path, encoder=spec.name, checkpoint_format=spec.checkpoint_format,
            missing=missing, unexpected=unexpected, mismatched=mismatched,
            hint=(hint and hint()) or f"Is this the published checkpoint of '{spec.name}'{source}?",
        )
    model.load_state_dict(converted, strict=True)
