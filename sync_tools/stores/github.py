"""The GitHub release store: one rolling release (``release.tag``) of ``release.repo`` holds every
subsystem's assets plus ``manifest.json`` and ``manifest.json.sig``. Built on PyGithub.

GitHub refuses an upload whose name exists (422 ``already_exists``) and an edit can only rename an
asset, so every replacement goes: upload under a temporary unique name ``<name>.tmp-<nonce>``, delete
the old asset, rename the new one to ``<name>``. Until the upload has completed nothing visible has
changed, so a failed upload never loses the old asset; there is always at least one complete copy
(old, or new under its temporary name). Temporary assets a crashed run left behind are removed once
they are older than ``stale_after``.

The manifest pair is replaced with compare-and-swap semantics built from GitHub's primitives:

* The CAS token is the manifest asset's ``id`` and ``updated_at``; every replacement makes a new
  asset, so a changed manifest always has a new token.
* ``write_manifest`` re-reads and compares tokens, uploads the new manifest and signature under
  temporary names, then deletes the old manifest **by id**. Exactly one of several writers that read
  the same manifest can delete it (the others get 404) -- that delete is the lock. A writer that loses
  it, or whose rename finds ``manifest.json`` taken, removes its temporaries and raises
  :class:`ManifestConflict`, having changed nothing visible.
* Order: manifest first, then signature. The manifest step is the commit point, so a losing writer
  never touches the signature. Between the two steps an agent can read the new manifest with the old
  signature; it fails verification and the agent refuses it and retries on its next event (agents
  never act on a pair that does not verify). Writing the signature first would let a losing writer
  clobber the winner's signature before finding out it lost.
* Both assets carry a label with the writer's nonce, ``"manifest.json (<nonce>)"``, so a reader can
  tell a matched pair from one caught mid-replacement. ``read_manifest`` waits (up to ``settle``
  seconds) for a pair in flight to complete, and rolls a crashed writer's complete, signed pair
  forward from its temporaries once they are older than ``stale_after``.
* After writing, the store re-reads; if another writer's manifest is in place, ManifestConflict tells
  the caller to redo its read-modify-write.

Agents download through ``browser_download_url`` (``asset_url``); during the few milliseconds between
deleting an old asset and renaming its replacement the name answers 404, which an agent treats as a
failed download and retries.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import http
import http.client
import io
import logging
import math
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from github import Auth, Github, GithubException, GithubRetry
from github.GitRelease import GitRelease
from github.GitReleaseAsset import GitReleaseAsset
from github.Repository import Repository
from github.Requester import HTTPRequestsConnectionClass, HTTPSRequestsConnectionClass, Requester
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from sync_tools.errors import DataError, RemoteError
from sync_tools.errtext import describe
from sync_tools.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME
from sync_tools.stores.base import ManifestBusy, ManifestConflict, Snapshot, Store

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
_TMP = re.compile(r"^(?P<name>.+)\.tmp-(?P<nonce>[0-9a-f]{16})$")
_PAIR_LABEL = re.compile(r"\((?P<nonce>[0-9a-f]{16})\)$")
_MAX_SIG_BYTES = 4096
# The longest rate-limit wait the store sits through; a longer Retry-After is the caller's to honour
# (RemoteError.retry_after), as a release job has better things to do than sleep for an hour.
MAX_RATE_LIMIT_WAIT = 120.0
_SECONDARY_RATE_WAIT = 60.0  # GitHub: "otherwise, wait for at least one minute"
_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


def _status(e: BaseException) -> int | None:
    if isinstance(e, GithubException):
        return e.status
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return e.response.status_code
    return None


def _seconds(value: object) -> float | None:
    try:
        return max(0.0, float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _rate_limit_wait(e: BaseException) -> float | None:
    """The seconds GitHub asks to wait before repeating the request *e* answered, or None when *e* is
    no rate-limit answer. GitHub's rule: Retry-After; else, with no requests left, until
    X-RateLimit-Reset; else at least a minute."""
    if not isinstance(e, GithubException) or e.status not in (403, 429):
        return None
    headers = {str(k).lower(): v for k, v in (e.headers or {}).items()}
    after = _seconds(headers.get("retry-after"))
    if after is not None:
        return after
    message = e.data.get("message") if isinstance(e.data, dict) else None
    if e.status != 429 and not Requester.isRateLimitError(message if isinstance(message, str) else ""):
        return None  # a plain 403: no permission
    reset = _seconds(headers.get("x-ratelimit-reset"))
    if headers.get("x-ratelimit-remaining") == "0" and reset is not None:
        return max(0.0, reset - time.time()) + 1  # +1: the reset falls somewhere in that second
    return _SECONDARY_RATE_WAIT


def _wait_out_rate_limit(e: BaseException) -> bool:
    """Sleep out a rate-limit answer and say True (send the request again), or say False when *e* is
    none or asks for longer than MAX_RATE_LIMIT_WAIT (the caller raises; RemoteError carries it)."""
    wait = _rate_limit_wait(e)
    if wait is None or wait > MAX_RATE_LIMIT_WAIT:
        return False
    log.info("GitHub asks to slow down (%s); waiting %.0fs", _github_message(e), wait)  # type: ignore[arg-type]
    time.sleep(wait)
    return True


def _github_message(e: GithubException) -> str:
    """GitHub's words for a failure, on one line: the JSON message; else the first line of a text
    body; else (an HTML error page: GitHub's 502/504) the HTTP reason."""
    data = e.data.get("message", e.data.get("data")) if isinstance(e.data, dict) else e.data
    if isinstance(data, str) and not data.lstrip().startswith("<"):
        line = next((ln for ln in data.splitlines() if ln.strip()), "")
        if line:
            return " ".join(line.split())[:300]
    try:
        return http.HTTPStatus(e.status).phrase
    except ValueError:
        return "no reason given"


def _at_edge(what: str) -> Callable[[_F], _F]:
    """Wrap PyGithub/requests failures of a public method into RemoteError, once, here."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(self: GitHubStore, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(self, *args, **kwargs)
            except GithubException as e:
                raise RemoteError(
                    f"{self.repo}@{self.tag}: {what}: GitHub answered {e.status}: {_github_message(e)}",
                    status_code=e.status,
                    retry_after=_rate_limit_wait(e),
                ) from e
            except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
                    ConnectionError, TimeoutError) as e:
                raise RemoteError(f"{self.repo}@{self.tag}: {what}: {describe(e)}", status_code=_status(e)) from e

        return wrapper  # type: ignore[return-value]

    return deco


class _CappedRetry(GithubRetry):
    """GithubRetry that never sleeps longer than ``max_rate_limit_wait``: GithubRetry applies that
    cap only to answers without Retry-After, and urllib3 sleeps up to 6 hours on one. A longer
    Retry-After ends the retries; the answer reaches the caller as a RemoteError with retry_after."""

    def increment(self, method: str | None = None, url: str | None = None, response: Any = None,
                  error: Exception | None = None, _pool: Any = None, _stacktrace: Any = None) -> Retry:
        if response is not None and self.max_rate_limit_wait is not None:
            wait = _seconds(response.headers.get("Retry-After"))
            if wait is not None and wait > self.max_rate_limit_wait:
                # urllib3 hands the answer back for this (raise_on_status=False): no sleep, no retry
                raise MaxRetryError(_pool, url or "", ResponseError(f"Retry-After {wait:g}s is over the cap"))
        return super().increment(method, url, response, error, _pool, _stacktrace)  # type: ignore[arg-type]


def _pair_nonce(asset: GitReleaseAsset | None) -> str | None:
    if asset is None:
        return None
    m = _PAIR_LABEL.search(asset.label or "")
    return m.group("nonce") if m else None


def _token(asset: GitReleaseAsset) -> str:
    return f"{asset.id}:{asset.updated_at.isoformat()}"


class GitHubStore(Store):
    """The release tagged *tag* in GitHub repository *repo* ("owner/name").

    *token* defaults to ``$GITHUB_TOKEN`` (none: anonymous, read-only), *base_url* to
    ``$GITHUB_API_URL`` or https://api.github.com; *github* injects a ready PyGithub client instead.
    Every request times out after *timeout* seconds; idempotent requests (GET, DELETE) are retried
    on connection errors and 5xx with backoff. Rate-limit answers (403/429 with Retry-After or a
    rate-limit message) are waited out, each wait up to MAX_RATE_LIMIT_WAIT (2 min), and the request
    is sent again (an upload under a fresh temporary name); a longer wait raises RemoteError with
    ``retry_after``. Failures raise RemoteError (carrying the HTTP status), bad data DataError.
    """

    def __init__(
        self,
        repo: str,
        tag: str,
        *,
        token: str | None = None,
        base_url: str | None = None,
        timeout: float = 30.0,
        github: Github | None = None,
        settle: float = 5.0,
        stale_after: float = 900.0,
    ):
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise DataError(f"release repo must be 'owner/name', not {repo!r}")
        self.repo = repo
        self.tag = tag
        self.base_url = (base_url or os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
        self.settle = settle
        self.stale_after = stale_after
        self.timeout = timeout
        self._retry: Retry | None = None
        if github is None:
            token = token or os.environ.get("GITHUB_TOKEN") or None
            self._retry = _CappedRetry(
                total=3,
                read=1,
                backoff_factor=0.5,
                # Never replay POST (an upload) or PATCH (a rename): the dance handles those.
                allowed_methods=Retry.DEFAULT_ALLOWED_METHODS,
                max_rate_limit_wait=MAX_RATE_LIMIT_WAIT,
                raise_on_status=False,  # the last answer's status reaches RemoteError.status_code
            )
            github = Github(
                auth=Auth.Token(token) if token else None,
                base_url=self.base_url,
                timeout=max(1, math.ceil(timeout)),  # PyGithub takes whole seconds
                per_page=100,
                retry=self._retry,
                # GitHub asks for pacing only for bulk writes; a release makes a handful, and its
                # secondary rate limits answer 403 + Retry-After, which the retry honours.
                seconds_between_requests=None,
                seconds_between_writes=None,
            )
        self._gh = github
        # Downloads leave the API host (a 302 to object storage): they go through this session,
        # which sends no credentials of its own (session.auth set: not even ~/.netrc's).
        self._http = requests.Session()
        self._http.auth = lambda r: r
        if self._retry is not None:
            for scheme in ("http://", "https://"):
                self._http.mount(scheme, requests.adapters.HTTPAdapter(max_retries=self._retry))
        self._repo_obj: Repository | None = None
        self._release_obj: GitRelease | None = None

    def __repr__(self) -> str:
        return f"GitHubStore({self.repo!r}, {self.tag!r}, base_url={self.base_url!r})"

    # ---------------------------------------------------------------------------------- release

    def _repo(self) -> Repository:
        if self._repo_obj is None:
            self._repo_obj = self._gh.get_repo(self.repo)
        return self._repo_obj

    def _find_release(self) -> GitRelease | None:
        if self._release_obj is None:
            try:
                self._release_obj = self._repo().get_release(self.tag)
            except GithubException as e:
                if e.status == 404:
                    return None
                raise
        return self._release_obj

    @_at_edge("ensure release")
    def ensure_release(self) -> None:
        """Create the rolling release (and its tag, from the default branch) if it does not exist.
        Idempotent; a parallel job creating it first (422) is fine. Raises RemoteError."""
        if self._find_release() is not None:
            return
        repo = self._repo()
        try:
            self._release_obj = repo.create_git_release(
                self.tag,
                name=self.tag,
                message="Rolling release maintained by sync-tools: every subsystem's newest assets "
                "and the signed manifest.json.",
            )
            log.info("created release %s of %s", self.tag, self.repo)
        except GithubException as e:
            if e.status != 422:
                raise
            log.info("release %s of %s was created concurrently", self.tag, self.repo)
            self._release_obj = repo.get_release(self.tag)

    def _release(self) -> GitRelease:
        self.ensure_release()
        assert self._release_obj is not None
        return self._release_obj

    def _assets(self) -> list[GitReleaseAsset]:
        rel = self._find_release()
        return [] if rel is None else list(rel.get_assets())

    # ---------------------------------------------------------------------------- asset dance

    def _upload(self, name: str, *, path: Path | None = None, data: bytes | None = None, label: str = "") -> GitReleaseAsset:
        """Upload under *name* (a fresh temporary name). On failure remove whatever the server kept."""
        rel = self._release()
        final = m.group("name") if (m := _TMP.match(name)) else name
        content_type = "application/gzip" if final.endswith(".tar.gz") else mimetypes.guess_type(final)[0]
        content_type = content_type or "application/octet-stream"
        try:
            if path is not None:
                size = path.stat().st_size
                with open(path, "rb") as fh:
                    asset = self._post_asset(rel, fh, size, name, content_type, label)
            else:
                assert data is not None
                size = len(data)
                asset = self._post_asset(rel, io.BytesIO(data), size, name, content_type, label)
        except (GithubException, requests.RequestException, OSError):
            self._discard_named(name)
            raise
        if asset.size != size:
            self._discard(asset)
            raise RemoteError(f"{self.repo}@{self.tag}: upload of {name} stored {asset.size} of {size} bytes")
        return asset

    def _post_asset(self, rel: GitRelease, fh: BinaryIO, size: int, name: str, content_type: str, label: str) -> GitReleaseAsset:
        """GitRelease.upload_asset_from_memory, on a connection with the store's timeout: PyGithub
        opens one without any for a host other than base_url's, and uploads go to uploads.github.com."""
        url = rel.upload_url.split("{?")[0]
        parts = urlsplit(url)
        cls = HTTPSRequestsConnectionClass if parts.scheme == "https" else HTTPRequestsConnectionClass
        cnx = cls(parts.hostname or "", parts.port, timeout=self.timeout, retry=self._retry)  # type: ignore[arg-type]
        requester = self._gh.requester
        try:
            headers, data = requester.requestMemoryBlobAndCheck(
                "POST",
                url,
                parameters={"label": label, "name": name},
                headers={"Content-Type": content_type, "Content-Length": str(size)},
                file_like=fh,
                cnx=cnx,
            )
        finally:
            cnx.close()
        return GitReleaseAsset(requester, headers, data, completed=True)

    def _discard(self, asset: GitReleaseAsset) -> None:
        """Delete *asset*, best effort (it is a temporary; a later run cleans up what this misses)."""
        try:
            asset.delete_asset()
        except (GithubException, requests.RequestException) as e:
            if _status(e) != 404:
                log.warning("could not delete temporary asset %s: %s", asset.name, e)

    def _discard_named(self, name: str) -> None:
        try:
            for asset in self._assets():
                if asset.name == name:
                    self._discard(asset)
        except (GithubException, requests.RequestException) as e:
            log.warning("could not look for a partial upload %s: %s", name, e)

    def _rename(self, asset: GitReleaseAsset, name: str, label: str = "") -> GitReleaseAsset:
        return asset.update_asset(name, label=label)

    def _clean_stale(self, assets: list[GitReleaseAsset], *, manifest_temps: bool) -> None:
        """Tidy temporaries older than ``stale_after`` (left by crashed runs).

        A stale asset temporary whose final name is missing is the only copy (the run died between
        deleting the old asset and renaming the new one): it is renamed into place, not deleted.
        Manifest temporaries are only touched when *manifest_temps* (the manifest has been read)."""
        present = {a.name for a in assets}
        for asset in sorted(assets, key=lambda a: (a.created_at, a.id), reverse=True):
            m = _TMP.match(asset.name)
            if m is None or not self._stale(asset.created_at):
                continue
            final = m.group("name")
            if final in (MANIFEST_NAME, SIGNATURE_NAME):
                if not manifest_temps:
                    continue
            elif final not in present:
                log.warning("%s@%s: finishing an interrupted upload of %s", self.repo, self.tag, final)
                self._rename_retrying(asset, final)
                present.add(final)
                continue
            log.info("removing %s, left over by an interrupted run", asset.name)
            self._discard(asset)

    def _rename_retrying(self, asset: GitReleaseAsset, name: str, label: str = "") -> GitReleaseAsset:
        """Rename, retrying a 5xx or a cut connection twice and a rate limit after the wait it asks
        for: PyGithub does not replay PATCH, and a rename to the same name is safe to repeat. It is
        worth the wait: the rename usually follows the delete of the asset it replaces."""
        for attempt in range(3):
            try:
                return self._rename(asset, name, label)
            except (GithubException, requests.ConnectionError, requests.Timeout) as e:
                if attempt < 2 and _wait_out_rate_limit(e):
                    continue
                status = _status(e)
                if (status is not None and status < 500) or attempt == 2:
                    raise
                log.info("renaming %s to %s failed (%s); retrying", asset.name, name, status or e)
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _uploading(self, upload: Callable[[str], _T]) -> _T:
        """``upload(nonce)`` with a fresh nonce, and once more with another after the wait GitHub asks
        for when a rate limit refused it (a fresh temporary name, so nothing the refused request may
        have left can collide)."""
        for attempt in range(3):
            try:
                return upload(secrets.token_hex(8))
            except GithubException as e:
                if attempt == 2 or not _wait_out_rate_limit(e):
                    raise
        raise AssertionError("unreachable")

    @_at_edge("upload asset")
    def upload_asset(self, path: Path, name: str) -> None:
        """Put *path* under *name*: upload as ``<name>.tmp-<nonce>``, delete the old asset, rename.

        A failed upload leaves the old asset in place. Raises DataError for a reserved or temporary
        name (the manifest pair goes through write_manifest), RemoteError for GitHub failures.
        """
        if name in (MANIFEST_NAME, SIGNATURE_NAME) or _TMP.match(name):
            raise DataError(f"{name!r} is reserved; the manifest pair is written by write_manifest")
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no such file to upload as {name}")
        self.ensure_release()
        assets = self._assets()
        self._clean_stale(assets, manifest_temps=False)
        new = self._uploading(lambda nonce: self._upload(f"{name}.tmp-{nonce}", path=path))
        try:
            self._swap_in(new, name)
        except BaseException:
            # The old asset still in place: drop ours. Gone: ours is the only copy; a later run
            # renames it into place once it is stale (_clean_stale).
            with contextlib.suppress(GithubException, requests.RequestException):
                if any(a.name == name for a in self._assets()):
                    self._discard(new)
            raise
        log.info("uploaded %s (%d bytes) to %s@%s", name, new.size, self.repo, self.tag)

    def _swap_in(self, new: GitReleaseAsset, name: str) -> None:
        """Delete every asset called *name*, then rename *new* to it."""
        for attempt in range(3):
            for old in (a for a in self._assets() if a.name == name):
                try:
                    old.delete_asset()
                except GithubException as e:
                    if e.status != 404:  # already gone: someone replaced it too; ours goes in
                        raise
            try:
                self._rename_retrying(new, name)
                return
            except GithubException as e:
                # Another job put the same name back between our delete and rename: go again.
                if e.status != 422 or attempt == 2:
                    raise

    # ------------------------------------------------------------------------------- manifest

    def _chunks(self, asset: GitReleaseAsset) -> Iterator[bytes]:
        """The asset's bytes from the asset API, following its redirect to object storage here:
        PyGithub follows it on a connection without a timeout. Credentials go only to the host that
        was asked first. Raises requests.RequestException (HTTPError for an error status)."""
        url = asset.url
        headers = {"Accept": "application/octet-stream", "User-Agent": "sync-tools"}
        auth = self._gh.requester.auth
        if auth is not None:
            auth.authentication(headers)
        for _ in range(5):
            r = self._http.get(url, headers=headers, timeout=self.timeout, stream=True, allow_redirects=False)
            if not r.is_redirect:
                break
            r.close()
            location = urljoin(url, r.headers["location"])
            if urlsplit(location).hostname != urlsplit(asset.url).hostname:
                headers.pop("Authorization", None)
            url = location
        else:
            raise requests.TooManyRedirects(f"{asset.name}: over 5 redirects")
        with r:
            r.raise_for_status()
            yield from r.iter_content(chunk_size=1 << 16)

    def _download(self, asset: GitReleaseAsset, cap: int) -> bytes:
        if asset.size > cap:
            raise DataError(f"{self.repo}@{self.tag}: {asset.name} is {asset.size} bytes, over the {cap} cap")
        buf = bytearray()
        for chunk in self._chunks(asset):
            buf += chunk
            if len(buf) > cap:
                raise DataError(f"{self.repo}@{self.tag}: {asset.name} is over the {cap} byte cap")
        return bytes(buf)

    def _stale(self, when: _dt.datetime) -> bool:
        return (_dt.datetime.now(_dt.UTC) - when).total_seconds() > self.stale_after

    def _roll_forward(self, assets: list[GitReleaseAsset], manifest: GitReleaseAsset | None) -> bool:
        """Finish a crashed writer's replacement from its temporaries; True when something changed.

        With no manifest, the newest stale manifest temporary becomes the manifest; with a manifest
        whose signature is not its pair, the signature temporary carrying its nonce takes the place."""
        temps = {}
        for a in assets:
            m = _TMP.match(a.name)
            if m:
                temps[(m.group("name"), m.group("nonce"))] = a
        if manifest is None:
            stale = [a for (n, _), a in temps.items() if n == MANIFEST_NAME and self._stale(a.created_at)]
            if not stale:
                return False
            newest = max(stale, key=lambda a: (a.created_at, a.id))
            log.warning("%s@%s: rolling an interrupted manifest write forward (%s)", self.repo, self.tag, newest.name)
            nonce = _TMP.match(newest.name).group("nonce")  # type: ignore[union-attr]
            with contextlib.suppress(GithubException):
                self._rename(newest, MANIFEST_NAME, f"{MANIFEST_NAME} ({nonce})")
                # Its signature now, not once the renamed manifest (a fresh updated_at) is stale too:
                # the pair was abandoned long ago, and readers would be refused meanwhile.
                if (sig_tmp := temps.get((SIGNATURE_NAME, nonce))) is not None:
                    self._install_signature(sig_tmp, nonce, assets)
            return True
        nonce = _pair_nonce(manifest)
        sig_tmp = temps.get((SIGNATURE_NAME, nonce)) if nonce else None
        if sig_tmp is None or not self._stale(manifest.updated_at):
            return False
        log.warning("%s@%s: rolling an interrupted signature write forward (%s)", self.repo, self.tag, sig_tmp.name)
        self._install_signature(sig_tmp, nonce or "", assets)
        return True

    def _install_signature(self, sig_tmp: GitReleaseAsset, nonce: str, assets: list[GitReleaseAsset]) -> None:
        for old in (a for a in assets if a.name == SIGNATURE_NAME):
            try:
                old.delete_asset()
            except GithubException as e:
                if e.status != 404:
                    raise
        self._rename_retrying(sig_tmp, SIGNATURE_NAME, f"{SIGNATURE_NAME} ({nonce})")

    def _consistent_pair(self) -> tuple[list[GitReleaseAsset], GitReleaseAsset | None, GitReleaseAsset | None]:
        """The asset list with a manifest and signature that belong together (or no manifest).

        Waits up to ``settle`` seconds for a writer in flight, rolls a crashed one forward, and
        raises RemoteError when a pair stays torn."""
        deadline = time.monotonic() + self.settle
        delay = 0.05
        while True:
            assets = self._assets()
            by_name = {a.name: a for a in assets}
            manifest, sig = by_name.get(MANIFEST_NAME), by_name.get(SIGNATURE_NAME)
            in_flight = any(
                (m := _TMP.match(a.name)) and m.group("name") == MANIFEST_NAME and not self._stale(a.created_at)
                for a in assets
            )
            if manifest is None and not in_flight:
                if not self._roll_forward(assets, None):
                    return assets, None, None
                continue
            if manifest is not None:
                nonce = _pair_nonce(manifest)
                # Unlabelled (written by another tool) or matched: the signature check decides.
                if nonce is None or (sig is not None and _pair_nonce(sig) == nonce):
                    return assets, manifest, sig
                if self._roll_forward(assets, manifest):
                    continue
                if self._stale(manifest.updated_at):
                    return assets, manifest, sig  # torn for good and nothing to finish it with
            if time.monotonic() >= deadline:
                raise ManifestBusy(
                    f"{self.repo}@{self.tag}: {MANIFEST_NAME} is being replaced by another writer "
                    f"(no matching pair within {self.settle:g}s); try again"
                )
            time.sleep(delay)
            delay = min(0.5, delay * 2)

    @_at_edge("read manifest")
    def read_manifest(self) -> Snapshot:
        """The manifest bytes, signature and CAS token (``<asset id>:<updated_at>``); all None when
        the release or its manifest does not exist. Raises RemoteError, DataError (over size caps)."""
        for _ in range(5):
            _, manifest, sig = self._consistent_pair()
            if manifest is None:
                return Snapshot(None, None, None)
            try:
                data = self._download(manifest, MAX_MANIFEST_BYTES)
                signature = self._download(sig, _MAX_SIG_BYTES) if sig is not None else None
            except (GithubException, requests.HTTPError) as e:
                if _status(e) == 404:  # replaced between listing and download: list again
                    continue
                raise
            return Snapshot(data, signature, _token(manifest))
        raise RemoteError(f"{self.repo}@{self.tag}: {MANIFEST_NAME} kept changing while being read")

    @_at_edge("write manifest")
    def write_manifest(self, data: bytes, signature: bytes, expected_token: str | None) -> None:
        """Replace manifest.json and its .sig if the manifest is still at *expected_token*.

        Raises ManifestConflict when another writer got there first (before or during this write;
        nothing of this write stays visible then unless it won), DataError for oversize input,
        RemoteError for GitHub failures (the previous pair, or a complete new one, stays in place).
        """
        if len(data) > MAX_MANIFEST_BYTES or len(signature) > _MAX_SIG_BYTES:
            raise DataError(f"manifest ({len(data)} bytes) or signature ({len(signature)} bytes) over its size cap")
        self.ensure_release()
        assets, current, _ = self._consistent_pair()
        found = _token(current) if current is not None else None
        if found != expected_token:
            raise ManifestConflict(
                f"{self.repo}@{self.tag}: {MANIFEST_NAME} changed since it was read "
                f"(expected {expected_token or 'none'}, found {found or 'none'})"
            )
        self._clean_stale(assets, manifest_temps=True)

        def upload_pair(nonce: str) -> tuple[str, GitReleaseAsset, GitReleaseAsset]:
            sig_tmp = self._upload(f"{SIGNATURE_NAME}.tmp-{nonce}", data=signature, label=f"{SIGNATURE_NAME} ({nonce})")
            try:
                man_tmp = self._upload(f"{MANIFEST_NAME}.tmp-{nonce}", data=data, label=f"{MANIFEST_NAME} ({nonce})")
            except BaseException:
                self._discard(sig_tmp)
                raise
            return nonce, sig_tmp, man_tmp

        nonce, sig_tmp, man_tmp = self._uploading(upload_pair)

        def lost(why: str) -> ManifestConflict:
            self._discard(man_tmp)
            self._discard(sig_tmp)
            return ManifestConflict(f"{self.repo}@{self.tag}: another writer replaced {MANIFEST_NAME} first ({why})")

        # The commit point: deleting the manifest we read succeeds for exactly one writer.
        if current is not None:
            try:
                current.delete_asset()
            except GithubException as e:
                if e.status == 404:
                    raise lost("the manifest read was already deleted") from e
                self._discard(man_tmp)
                self._discard(sig_tmp)
                raise
        try:
            man_tmp = self._rename_retrying(man_tmp, MANIFEST_NAME, f"{MANIFEST_NAME} ({nonce})")
        except GithubException as e:
            if e.status == 422:
                raise lost("manifest.json appeared meanwhile") from e
            # The old manifest is gone and ours stays a complete temporary: the next reader rolls it
            # forward once it is stale, so nothing is lost.
            raise

        # Now the signature, only while the manifest is still ours.
        for _ in range(3):
            assets = self._assets()
            ours = any(a.id == man_tmp.id and a.name == MANIFEST_NAME for a in assets)
            if not ours:
                self._discard(sig_tmp)
                raise ManifestConflict(f"{self.repo}@{self.tag}: a newer {MANIFEST_NAME} replaced this one")
            try:
                self._install_signature(sig_tmp, nonce, assets)
                break
            except GithubException as e:
                if e.status != 422:
                    raise
        else:
            raise RemoteError(f"{self.repo}@{self.tag}: could not put {SIGNATURE_NAME} in place")

        _, after, _ = self._consistent_pair()
        if after is None or after.id != man_tmp.id:
            raise ManifestConflict(f"{self.repo}@{self.tag}: another writer's {MANIFEST_NAME} won")
        log.info("wrote %s@%s %s (%d bytes, pair %s)", self.repo, self.tag, MANIFEST_NAME, len(data), nonce)

    # ---------------------------------------------------------------------------------- listing

    @_at_edge("list assets")
    def list_assets(self) -> dict[str, int]:
        """Asset name -> size, including manifest.json and its .sig, without temporaries."""
        return dict(sorted((a.name, a.size) for a in self._assets() if not _TMP.match(a.name)))

    @_at_edge("download asset")
    def download_asset(self, name: str, out: BinaryIO, *, max_bytes: int) -> int:
        """Stream asset *name* to *out*. Raises RemoteError (404) when missing, DataError over *max_bytes*."""
        found = [a for a in self._assets() if a.name == name]
        if not found:
            raise RemoteError(f"{self.repo}@{self.tag}: no asset {name}", status_code=404)
        asset = found[0]
        if asset.size > max_bytes:
            raise DataError(f"{self.repo}@{self.tag}: {name} is {asset.size} bytes, over the {max_bytes} cap")
        done = 0
        for chunk in self._chunks(asset):
            done += len(chunk)
            if done > max_bytes:
                raise DataError(f"{self.repo}@{self.tag}: {name} is over the {max_bytes} byte cap")
            out.write(chunk)
        return done

    @_at_edge("delete asset")
    def delete_asset(self, name: str) -> None:
        """Delete every asset called *name* (none is fine). Raises DataError for the manifest pair."""
        if name in (MANIFEST_NAME, SIGNATURE_NAME) or _TMP.match(name):
            raise DataError(f"{name!r} is reserved; the manifest pair is written by write_manifest")
        for asset in (a for a in self._assets() if a.name == name):
            try:
                asset.delete_asset()
            except GithubException as e:
                if e.status != 404:
                    raise
            log.info("deleted %s from %s@%s", name, self.repo, self.tag)

    @_at_edge("asset url")
    def asset_url(self, name: str) -> str:
        """The asset's ``browser_download_url``; for an asset not uploaded yet, the URL it will have."""
        for a in self._assets():
            if a.name == name:
                return a.browser_download_url
        rel = self._find_release()
        if rel is None:
            raise RemoteError(f"{self.repo}@{self.tag}: the release does not exist", status_code=404)
        return rel.html_url.replace("/releases/tag/", "/releases/download/", 1) + "/" + name

