"""Hugging Face Hub access through huggingface_hub's cache.

Honours ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and tokens exactly as
huggingface_hub does. Offline and not cached gives one clear sentence saying what to fetch.
"""

from __future__ import annotations

from pathlib import Path


class HubError(RuntimeError):
    """A Hub file could not be resolved (offline and not cached, missing repo or file)."""


def hub_file(repo_id: str, filename: str, *, revision: str | None = None) -> Path:
    """Local path of ``filename`` from Hub repo ``repo_id``, downloading into the cache if allowed.

    Raises :class:`HubError` with a one-sentence explanation when the file cannot be had.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, revision=revision))
    except GatedRepoError as err:
        raise HubError(
            f"{where} is gated: accept its licence on huggingface.co and log in with "
            "`huggingface-cli login` (or set HF_TOKEN)"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubError(f"Hub repository {repo_id!r} was not found (or needs a token)") from err
    except RevisionNotFoundError as err:
        raise HubError(f"revision {revision!r} of {repo_id!r} was not found") from err
    except LocalEntryNotFoundError as err:
        raise HubError(
            f"{where} is not in the local Hugging Face cache and downloads are disabled or "
            f"unreachable: run `sapiens2 download {repo_id}` (or `huggingface-cli download "
            f"{repo_id} {filename}`) on a machine with network access and share its HF_HOME"
        ) from err
    except EntryNotFoundError as err:
        raise HubError(f"{repo_id!r} has no file {filename!r}") from err


def is_cached(repo_id: str, filename: str, *, revision: str | None = None) -> bool:
    """Whether ``filename`` of ``repo_id`` is already in the local cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id=repo_id, filename=filename, revision=revision)
    return isinstance(found, str)
