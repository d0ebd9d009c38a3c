"""Where weights come from: release downloads (URL + SHA-256) and the Hugging Face Hub.

Released weights (a :class:`~unicom.models.registry.ModelCfg` with ``url`` and ``sha256``):

* cache: ``download_root``, else ``$UNICOM_CACHE``, else ``$XDG_CACHE_HOME/unicom``, else
  ``~/.cache/unicom``;
* source: the URL of the registry entry, or ``$UNICOM_BASE_URL/<file name>`` (a mirror:
  ``https://…``, or a folder or ``file:///…`` on a shared disk);
* ``UNICOM_OFFLINE=1`` never touches the network: a cached file loads, a missing one is
  an error that says where to put it.

Model folders on the Hub (``hf-hub:org/repo``, or ``hf-hub:org/repo@revision``) are
fetched with ``huggingface_hub`` into its own cache (``$HF_HOME``; ``$HF_ENDPOINT`` names
another Hub, ``HF_HUB_OFFLINE=1`` or ``UNICOM_OFFLINE=1`` use the cache only).
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

from unicom.errors import InputError
from unicom.files import atomic_path, exclusive, file_sha256, remove_killed_writes

HF_PREFIX = "hf-hub:"


# ------------------------------------------------------------------- released weights


def cache_dir(download_root: str | os.PathLike | None = None) -> Path:
    """Where downloaded weights are kept (see the module docstring for the order)."""
    from unicom.storage import cache_root

    return cache_root(download_root)


def offline() -> bool:
    """Whether UNICOM_OFFLINE is set: nothing is downloaded, files come from the caches only."""
    return os.environ.get("UNICOM_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def download(url: str, sha256: str, root: str | os.PathLike, timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``root`` (unless a copy with this SHA-256 is there) and verify it.

    The file is written under a temporary name and renamed only after its SHA-256 matched;
    on a mismatch nothing is kept and :class:`InputError` is raised. Returns the path.
    """
    root = Path(root)
    target = root / url.rsplit("/", 1)[-1]
    where = (
        f"Without network access, put the file (SHA-256 {sha256}) at {target}, "
        "or set UNICOM_BASE_URL to a mirror holding it"
    )
    stale = None
    if target.is_file():
        actual = file_sha256(target)
        if actual == sha256:
            return target
        stale = f"the cached {target} has SHA-256 {actual}, expected {sha256}"
    if offline():
        raise InputError(f"{stale or f'{target} is not in the cache'} and UNICOM_OFFLINE is set. {where}")
    if stale:
        warnings.warn(f"{stale}; downloading it again")
    root.mkdir(parents=True, exist_ok=True)
    with exclusive(root / f".{target.name}.lock"):  # one download per file, across processes
        if target.is_file() and target.stat().st_size and file_sha256(target) == sha256:
            return target  # another process finished it while we waited
        remove_killed_writes(target)  # a download that was killed: as large as the part it got
        _fetch(url, sha256, target, timeout, where)
    return target


def _fetch(url: str, sha256: str, target: Path, timeout: float, where: str) -> None:
    from unicom.progress import progress

    with atomic_path(target) as tmp:
        try:
            response = urllib.request.urlopen(url, timeout=timeout)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise InputError(f"could not download {url} ({getattr(error, 'reason', error)}). {where}") from error
        digest = hashlib.sha256()
        with response, open(tmp, "wb") as out:
            length = response.headers.get("Content-Length")
            with progress(total=int(length) if length else None, desc=target.name, unit="B", unit_divisor=1024) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != sha256:
            raise InputError(
                f"{url}: downloaded file has SHA-256 {digest.hexdigest()}, expected {sha256}; it was not kept. "
                "A mirror may hold a different file or the download was corrupted; try again"
            )


def weights_url(name: str, base_url: str | None = None) -> str:
    """The URL of a registered model's weights: ``base_url`` or ``$UNICOM_BASE_URL`` + file
    name (a mirror holding the files side by side: a URL, or a local folder taken as its
    ``file://`` URL), else the URL in the registry."""
    from unicom.models.registry import model_cfg

    cfg = model_cfg(name)
    base = base_url or os.environ.get("UNICOM_BASE_URL")
    if base and not urllib.parse.urlsplit(base).scheme:  # a folder on a shared disk (file:/shared is a URL)
        base = Path(base).expanduser().resolve().as_uri()
    return f"{base.rstrip('/')}/{cfg.file_name}" if base else cfg.url


def weights_path(name: str, download_root: str | os.PathLike | None = None, base_url: str | None = None) -> Path:
    """The verified local file of a registered model's weights, downloaded if needed."""
    from unicom.models.registry import model_cfg

    return download(weights_url(name, base_url), model_cfg(name).sha256, cache_dir(download_root))


# ------------------------------------------------------------------ Hugging Face Hub


class NotAModelFolder(InputError):
    """The Hub repository exists but holds no ``unicom_model.json``."""


class NotInCache(InputError):
    """A Hub file is not in the local cache and cannot be downloaded now."""


def is_hf_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def split_hf_spec(spec: str) -> tuple[str, str, str | None]:
    """``"hf-hub:org/repo/sub/folder@revision"`` -> ``("org/repo", "sub/folder", "revision")``: the
    repository, the folder in it that holds the model ("" for its root, as in ``hf-hub:org/repo``)
    and the revision (None when absent; a revision may hold ``/``: ``@refs/pr/1``)."""
    path, _, revision = spec[len(HF_PREFIX):].partition("@")
    parts = path.split("/")
    if len(parts) < 2 or not all(parts) or any(part in (".", "..") for part in parts):
        raise InputError(f"{spec}: expected hf-hub:<owner>/<repository>[/<folder>][@<revision>]")
    return "/".join(parts[:2]), "/".join(parts[2:]), revision or None


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """``"hf-hub:org/repo@revision"`` -> ``("org/repo", "revision")`` (revision None when absent);
    a folder in the repository is left out (:func:`split_hf_spec`)."""
    repo, _, revision = split_hf_spec(spec)
    return repo, revision


def hf_commit(path: Path, spec: str) -> str:
    """The commit of a file that :func:`hf_file` gave for ``spec``, from its place in the cache
    (``snapshots/<commit>/[<folder>/]<file>``): the repository's other files are fetched at it."""
    folder = split_hf_spec(spec)[1]
    return path.parents[len(folder.split("/")) if folder else 0].name


def hf_file(spec: str, filename: str, revision: str | None = None) -> Path:
    """One file of the Hub repository ``spec`` names (in the folder it names, if any), from the
    Hugging Face cache or downloaded into it.

    Raises :class:`NotAModelFolder` when the repository has no such file,
    :class:`NotInCache` when it is not cached and cannot be downloaded (offline, or the
    Hub unreachable), and an :class:`InputError` that says what to do for a missing
    repository or revision.
    """
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.utils import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as error:
        raise InputError(f"{spec}: models on the Hugging Face Hub need huggingface_hub ({error}); pip install 'huggingface_hub>=0.23'") from error

    repo, folder, spec_revision = split_hf_spec(spec)
    revision = revision or spec_revision
    endpoint = constants.ENDPOINT
    try:
        return Path(hf_hub_download(repo, filename, subfolder=folder or None, revision=revision,
                                    local_files_only=offline()))
    except LocalEntryNotFoundError as error:  # before EntryNotFoundError: it is one
        if offline() or constants.HF_HUB_OFFLINE:
            why = "downloads are off (UNICOM_OFFLINE or HF_HUB_OFFLINE)"
        else:
            why = f"{endpoint} could not be reached"
        raise NotInCache(
            f"{spec}: {filename} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}. "
            "Run once with network access, or copy the cache from a machine that has it"
        ) from error
    except EntryNotFoundError as error:
        where = f"the folder {folder} of {repo}" if folder else "the repository"
        raise NotAModelFolder(f"{spec}: {where} has no {filename}") from error
    except RevisionNotFoundError as error:
        raise InputError(f"{spec}: revision {revision!r} does not exist in {repo} on {endpoint}") from error
    except RepositoryNotFoundError as error:
        raise InputError(
            f"{spec}: no repository {repo} on {endpoint} (or it is private or gated: log in with `hf auth login` "
            "or set HF_TOKEN)"
        ) from error
    except OSError as error:  # HTTP errors and answers that are not the Hub's
        raise InputError(f"{spec}: could not fetch {filename} from {endpoint} ({error})") from error


def hf_model_folder(spec: str) -> Path:
    """The local copy of a unicom model folder on the Hub: ``unicom_model.json``, then the
    weights of the same commit. Returns the snapshot folder in the Hugging Face cache."""
    from unicom.models.export import CONFIG_NAME, WEIGHTS_NAME

    config = hf_file(spec, CONFIG_NAME)
    commit = hf_commit(config, spec)  # both files from one commit
    try:
        hf_file(spec, WEIGHTS_NAME, revision=commit)
    except NotAModelFolder as error:
        where = "the repository" if not split_hf_spec(spec)[1] else f"the folder {split_hf_spec(spec)[1]}"
        raise InputError(f"{spec}: {where} has {CONFIG_NAME} but no {WEIGHTS_NAME}; upload the whole model folder") from error
    return config.parent
