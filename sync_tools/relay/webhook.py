"""GitHub webhook deliveries: signature check, body decoding and classification. Pure, no I/O.

The order matters and is the security boundary: the signature is checked over the exact raw bytes
before anything parses them; only a verified body is decoded (JSON, or the ``payload=`` field of a
form-encoded body) and classified into a typed, frozen result.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

import orjson

from sync_tools.config import Config, Subsystem
from sync_tools.errors import DataError
from sync_tools.versions import held_back, parse_version, select

_SIG_RE = re.compile(r"^sha256=([0-9a-fA-F]{64})$")
_SHA40 = re.compile(r"^[0-9a-f]{40}$")
_COMMIT_ID = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")  # SHA-1 or SHA-256 repositories
_ZERO_SHA = "0" * 40


class WebhookError(DataError):
    """A delivery the relay refuses; ``status`` is the HTTP status to answer with."""

    status = 400


class Unauthorized(WebhookError):
    status = 401


class BadRequest(WebhookError):
    status = 400


class UnreadableBody(BadRequest):
    """The request body could not be read to its end (cut short, badly chunked): the connection is
    out of step and is closed after the answer."""


class TooLarge(WebhookError):
    status = 413


class RequestTimeout(WebhookError):
    status = 408


# ----------------------------------------------------------------------------------------- signature


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Hub-Signature-256`` value GitHub would send for *body*."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, body: bytes, sig256: str | None, sig1: str | None = None) -> None:
    """Check ``X-Hub-Signature-256`` over the raw *body* in constant time.

    Raises Unauthorized when the header is missing (naming the SHA-1-only case), malformed or wrong.
    """
    if not sig256:
        if sig1:
            raise Unauthorized("only an X-Hub-Signature (SHA-1) header was sent; "
                               "X-Hub-Signature-256 is required")
        raise Unauthorized("missing X-Hub-Signature-256")
    m = _SIG_RE.match(sig256.strip())
    if not m:
        raise Unauthorized("malformed X-Hub-Signature-256 (expected sha256=<64 hex digits>)")
    expected = hmac.new(secret, body, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, bytes.fromhex(m.group(1))):
        raise Unauthorized("X-Hub-Signature-256 does not match the body")


# ------------------------------------------------------------------------------------------ decoding


def decode_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The payload object of a verified body: JSON, or form-encoded with a ``payload`` field.

    Raises BadRequest for undecodable bytes, bad JSON, or anything but a JSON object.
    """
    mime = (content_type or "application/json").split(";", 1)[0].strip().lower()
    text: str | bytes
    if mime == "application/x-www-form-urlencoded":
        try:
            fields = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True, max_num_fields=64)
        except (UnicodeDecodeError, ValueError) as e:
            raise BadRequest(f"form body cannot be decoded: {e}") from e
        values = fields.get("payload")
        if not values or len(values) != 1:
            raise BadRequest("form body must carry exactly one payload= field")
        text = values[0]
    elif mime == "application/json" or mime.endswith("+json"):
        text = body  # orjson checks the UTF-8 itself
    else:
        raise BadRequest(f"unsupported content type {mime!r} (use application/json)")
    # orjson: a strict RFC 8259 parser (invalid UTF-8, NaN, lone surrogates and nesting deeper than
    # 1024 are errors) at a third of the stdlib's cost, which is most of the accept path's CPU
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise BadRequest(f"payload must be a JSON object, not {type(obj).__name__}")
    return obj


# ------------------------------------------------------------------------------- repository matching


@functools.lru_cache(maxsize=4096)
def repo_key(value: str) -> tuple[str | None, str] | None:
    """(host, lower-case path) naming a repository, from a URL, an scp-like git address, an
    ``owner/name`` slug or a local path; ``.git`` and trailing slashes dropped. None if unusable.

    A slug has no host (it matches the same owner/name on any host); a local path gets host
    ``file`` so that loopback upstreams (the demo's) can be matched too.
    """
    v = value.strip()
    if not v:
        return None
    host: str | None
    scp = re.match(r"^[\w.-]+@([\w.-]+):(?!//)(.+)$", v)
    if scp:
        host, path = scp.group(1), scp.group(2)
    elif "://" in v:
        try:
            u = urllib.parse.urlsplit(v)
        except ValueError:  # e.g. an unbalanced '[' ("Invalid IPv6 URL"): names no repository
            return None
        if u.scheme == "file":
            host, path = "file", u.path
        else:
            host, path = (u.hostname or ""), u.path
    elif v.startswith(("/", "./", "../", "~")):
        host, path = "file", v
    elif re.match(r"^[\w.-]+/[\w.-]+$", v):
        host, path = None, v
    else:
        return None
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[:-4]
    path = path.rstrip("/")
    if host == "file":
        return "file", str(PurePosixPath("/" + path)).lower()
    if not path:
        return None
    return (host.lower() if host else None), path.lower()


_REPO_FIELDS = ("html_url", "clone_url", "git_url", "ssh_url", "svn_url", "full_name")


def payload_repo_keys(repo: dict[str, Any]) -> list[tuple[str | None, str]]:
    """Every way the payload's ``repository`` object names itself; empty (it names no repository)
    unless every field given is plain ASCII without surrounding space, names a repository, and all of
    them name the same one. One field matching the upstream is not enough: a ``full_name`` of another
    owner next to the upstream's ``clone_url``, or a Kelvin sign that lower-cases to ``k``, is not it."""
    keys = []
    for field_name in _REPO_FIELDS:
        value = repo.get(field_name)
        if value is None:
            continue
        if not isinstance(value, str) or not value.isascii() or value != value.strip():
            return []  # GitHub's names are ASCII, and it sends them without padding
        k = repo_key(value)
        if k is None:
            return []
        keys.append(k)
    return keys if _agree(keys) else []


def _agree(keys: list[tuple[str | None, str]]) -> bool:
    """Whether the keys name one repository: every hosted key the same, every local path the same,
    never both, and a bare ``owner/name`` equal to their path (or, for a local path, its name)."""
    hosted = {k for k in keys if k[0] not in (None, "file")}
    local = {k for k in keys if k[0] == "file"}
    slugs = {path for host, path in keys if host is None}
    if len(hosted) > 1 or len(local) > 1 or (hosted and local) or len(slugs) > 1:
        return False
    if not slugs:
        return True
    (slug,) = slugs
    if hosted:
        return next(iter(hosted))[1] == slug
    # a local path (the demo's, the tests') has no owner on any host: its name must agree
    return not local or next(iter(local))[1].rsplit("/", 1)[-1] == slug.rsplit("/", 1)[-1]


class _Names:
    """The payload repository's names, arranged for one set lookup per configured upstream."""

    __slots__ = ("keys", "hosted", "paths")

    def __init__(self, keys: list[tuple[str | None, str]]):
        self.keys = set(keys)
        self.hosted = any(host is not None for host, _ in keys)  # the payload says which host it is on
        self.paths = {path for host, path in keys if host != "file"}

    def match(self, configured: str) -> bool:
        want = repo_key(configured)
        if want is None:
            return False
        host, path = want
        if host == "file":  # a local path matches only the same path
            return want in self.keys
        if host is None:  # owner/name only: any host
            return path in self.paths
        # a configured host must be the payload's host, when the payload names one
        return want in self.keys if self.hosted else path in self.paths


def repo_matches(configured: str, repo: dict[str, Any]) -> bool:
    """Whether the payload repository is the configured one (case-insensitive, ``.git`` or not,
    any host when the config names only ``owner/name``; a named host must agree)."""
    return _Names(payload_repo_keys(repo)).match(configured)


# ---------------------------------------------------------------------------------- classification


@dataclass(frozen=True)
class Ping:
    """GitHub's hook test; answered 200."""

    delivery: str
    zen: str | None
    hook_id: int | None


@dataclass(frozen=True)
class Ignored:
    """A verified delivery the relay does not act on; answered 200 ``ignored``."""

    delivery: str
    event: str
    reason: str


@dataclass(frozen=True)
class UpstreamChange:
    """A new upstream version of a tracked subsystem: to be dispatched."""

    delivery: str
    event: str  # release | create | push
    subsystem: str
    version: str
    commit: str | None
    upstream: str

    def client_payload(self) -> dict[str, Any]:
        """The ``client_payload`` of the repository_dispatch (5 keys; GitHub allows 10)."""
        return {"subsystem": self.subsystem, "version": self.version, "commit": self.commit,
                "upstream": self.upstream, "delivery": self.delivery}


@dataclass(frozen=True)
class OwnRelease:
    """A release event of ``release.repo`` itself: agents are told, from the verified manifest."""

    delivery: str
    action: str
    tag: str


Classification = Ping | Ignored | UpstreamChange | OwnRelease

_RELEASE_ACTIONS = ("published", "released")
_OWN_RELEASE_ACTIONS = ("published", "released", "edited")


def _field(obj: Any, key: str, typ: type | tuple[type, ...], where: str, *, optional: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise BadRequest(f"{where} must be an object")
    if key not in obj or obj[key] is None:
        if optional:
            return None
        raise BadRequest(f"{where}.{key} is missing")
    value = obj[key]
    if isinstance(value, bool) and typ is not bool or not isinstance(value, typ):
        raise BadRequest(f"{where}.{key} must be {getattr(typ, '__name__', typ)}, not {type(value).__name__}")
    return value


_NOT_IN_TAGS = re.compile(r"[\s\x00-\x1f\x7f]")


def _tag_name(value: str, where: str) -> str:
    """*value* if git could name a tag so (non-empty, no whitespace or control characters, at most 255
    characters): it becomes the version a build is asked for. Raises BadRequest otherwise."""
    if not value or len(value) > 255 or _NOT_IN_TAGS.search(value):
        raise BadRequest(f"{where} is not a tag name: {value[:80]!r}")
    return value


def _tag_allowed(sub: Subsystem, tag: str) -> str | None:
    """None if *tag* may become *sub*'s version, else the reason it may not: the include/exclude
    filters, then the pin (a tag no newer than ``current``, or a new major under ``major: manual``,
    is not built; ``check`` reports the new major)."""
    if sub.include is not None and not sub.include.search(tag):
        return f"tag {tag!r} does not match {sub.name}.include"
    if sub.exclude is not None and sub.exclude.search(tag):
        return f"tag {tag!r} matches {sub.name}.exclude"
    # what check would take: no pre-release unless the subsystem takes them, and, with a pin, only a
    # version of the pin's line of tags (simple-tag, nightly-20241215 and release-1.2 are not v2.10.x)
    v = parse_version(tag)
    if v is not None and v.prerelease and not sub.prereleases:
        return f"{tag} is a pre-release ({sub.name} does not take pre-releases)"
    if sub.current and not select([tag], current=sub.current, prereleases=True, major="auto").latest:
        pinned = parse_version(sub.current)
        if pinned is not None:
            return f"{tag} is no version of the pinned {sub.current}'s line of tags"
    reason = held_back(tag, sub.current, major=sub.major)
    return f"{sub.name}: {reason}" if reason else None


def _classify_for(sub: Subsystem, event: str, payload: dict[str, Any], repo: dict[str, Any],
                  delivery: str) -> UpstreamChange | Ignored:
    def change(version: str, commit: str | None) -> UpstreamChange:
        return UpstreamChange(delivery=delivery, event=event, subsystem=sub.name, version=version,
                              commit=commit, upstream=sub.upstream)

    def ignored(reason: str) -> Ignored:
        return Ignored(delivery=delivery, event=event, reason=reason)

    if event == "release":
        if sub.strategy == "commits":  # its version is a branch head: only a push to the branch moves it
            return ignored(f"release ({sub.name} follows commits)")
        action = _field(payload, "action", str, "payload")
        release = _field(payload, "release", dict, "payload")
        tag = _tag_name(_field(release, "tag_name", str, "release"), "release.tag_name")
        prerelease = _field(release, "prerelease", bool, "release", optional=True) or False
        draft = _field(release, "draft", bool, "release", optional=True) or False
        if draft:
            return ignored("draft release")
        if action == "prereleased" or (prerelease and action in _RELEASE_ACTIONS):
            if not sub.prereleases:
                return ignored(f"prerelease {tag} ({sub.name} does not take prereleases)")
            if action not in ("prereleased", "published"):
                return ignored(f"release action {action!r}")
        elif action not in _RELEASE_ACTIONS:
            return ignored(f"release action {action!r}")
        reason = _tag_allowed(sub, tag)
        if reason:
            return ignored(reason)
        target = _field(release, "target_commitish", str, "release", optional=True)
        return change(tag, target if target and _SHA40.match(target) else None)

    if event == "create":
        ref_type = _field(payload, "ref_type", str, "payload")
        ref = _field(payload, "ref", str, "payload")
        if ref_type != "tag":
            return ignored(f"create of a {ref_type}")
        if sub.strategy != "tags":  # as for a tag push: a bare tag is no release, nor a branch head
            return ignored(f"tag created ({sub.name} follows {sub.strategy})")
        ref = _tag_name(ref, "payload.ref")
        reason = _tag_allowed(sub, ref)
        return ignored(reason) if reason else change(ref, None)

    if event == "push":
        ref = _field(payload, "ref", str, "payload")
        after = _field(payload, "after", str, "payload")
        deleted = _field(payload, "deleted", bool, "payload", optional=True) or False
        if deleted or after == _ZERO_SHA:
            return ignored(f"deletion of {ref}")
        if ref.startswith("refs/tags/"):
            tag = _tag_name(ref[len("refs/tags/"):], "payload.ref")
            if sub.strategy != "tags":
                return ignored(f"tag push ({sub.name} follows {sub.strategy})")
            reason = _tag_allowed(sub, tag)
            return ignored(reason) if reason else change(tag, after if _SHA40.match(after) else None)
        if ref.startswith("refs/heads/"):
            branch = ref[len("refs/heads/"):]
            default = repo.get("default_branch") if isinstance(repo.get("default_branch"), str) else None
            tracked = sub.branch or (default if sub.strategy == "commits" else None)
            if tracked is None and sub.current and branch == sub.current and not _SHA40.match(sub.current):
                # a pin that names a branch (plat-telemetry pins arc to main): check and build follow
                # its head, so a push to it is the change
                tracked = branch
            if tracked is None:
                return ignored(f"branch push ({sub.name} follows {sub.strategy}, no branch configured)")
            if branch != tracked:
                return ignored(f"push to {branch!r}, not the tracked branch {tracked!r}")
            if not _COMMIT_ID.match(after):  # it becomes the version: a build's .version, a dispatch
                raise BadRequest(f"payload.after {after[:80]!r} is not a commit id")
            return change(after, after)
        return ignored(f"push to {ref!r}")

    return ignored(f"event {event!r} is not tracked")


# The fields a tracked event must carry, checked whatever the repository (a malformed delivery is a
# 400 even when it would have been ignored).
_REQUIRED: dict[str, tuple[tuple[str | None, str, type], ...]] = {
    "release": ((None, "action", str), (None, "release", dict), ("release", "tag_name", str)),
    "create": ((None, "ref", str), (None, "ref_type", str)),
    "push": ((None, "ref", str), (None, "after", str)),
}


def _validate(event: str, payload: dict[str, Any]) -> None:
    for parent, key, typ in _REQUIRED.get(event, ()):
        obj = payload if parent is None else payload[parent]
        _field(obj, key, typ, parent or "payload")


def classify(config: Config, event: str, payload: dict[str, Any], delivery: str,
             path_subsystem: str | None = None) -> list[Classification]:
    """What a verified delivery means: one result per matching subsystem (usually one).

    ``path_subsystem`` is the ``<subsystem>`` of ``POST /webhook/<subsystem>``: it must be a
    configured subsystem and the payload's repository must be its upstream.

    Raises BadRequest for missing or mistyped fields, an unknown path subsystem, or a path that
    disagrees with the payload.
    """
    if event == "ping":
        hook_id = payload.get("hook_id")
        zen = payload.get("zen")
        return [Ping(delivery=delivery, zen=zen if isinstance(zen, str) else None,
                     hook_id=hook_id if isinstance(hook_id, int) and not isinstance(hook_id, bool) else None)]
    if event not in _REQUIRED:
        # before the path and repository checks: an event the relay does not track (organization,
        # member, ...) may name no repository, and is answered "ignored" whatever the URL
        return [Ignored(delivery=delivery, event=event, reason=f"event {event!r} is not tracked")]
    if path_subsystem is not None and path_subsystem not in config.subsystems:
        raise BadRequest(f"unknown subsystem {path_subsystem!r} in the URL path")
    _validate(event, payload)
    repo = _field(payload, "repository", dict, "payload")
    full_name = _field(repo, "full_name", str, "repository", optional=True)
    if full_name is None and not any(isinstance(repo.get(k), str) for k in ("html_url", "clone_url")):
        raise BadRequest("repository has neither full_name nor html_url/clone_url")

    names = _Names(payload_repo_keys(repo))  # once per payload, not once per subsystem
    matches = [s for s in config.subsystems.values() if names.match(s.upstream)]  # in config order
    if path_subsystem is not None:
        if path_subsystem not in {s.name for s in matches}:
            raise BadRequest(f"payload repository {full_name or repo.get('html_url')!r} is not "
                             f"{path_subsystem!r}'s upstream ({config.subsystems[path_subsystem].upstream})")
        matches = [config.subsystems[path_subsystem]]

    if event == "release" and config.release.repo and names.match(config.release.repo):
        action = _field(payload, "action", str, "payload")
        release = _field(payload, "release", dict, "payload")
        tag = _field(release, "tag_name", str, "release")
        if action in _OWN_RELEASE_ACTIONS:
            return [OwnRelease(delivery=delivery, action=action, tag=tag)]
        return [Ignored(delivery=delivery, event=event, reason=f"own release action {action!r}")]

    if not matches:
        return [Ignored(delivery=delivery, event=event,
                        reason=f"repository {full_name or repo.get('html_url')!r} is not tracked")]
    return [_classify_for(sub, event, payload, repo, delivery) for sub in matches]
