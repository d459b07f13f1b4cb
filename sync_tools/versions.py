"""Version tags: parsing, ordering and choosing the newest, as versions rather than strings.

Pure functions over tag names; no I/O. ``release-1.10`` sorts above ``release-1.2``; a leading ``v``
or any other non-numeric prefix (``release-``, ``go``, ``nats-server-v``) is tolerated; suffixes are
read through :mod:`packaging` where they fit PEP 440 (``-rc.1``, ``-RC.1``, ``-beta.2``, ``.dev3``,
``+build``) and as semver pre-release identifiers otherwise (``-alpha.x.7``). A tag that cannot be
ordered is skipped by :func:`select`; nothing here raises on a strange tag.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

# prefix (anything up to the first digit that starts a dotted number), the dotted number, the rest
# (ASCII digits only: \d would read full-width and other scripts' digits, which int() accepts)
_TAG_RE = re.compile(r"^(?P<prefix>[^0-9]*?)(?P<release>[0-9]+(?:[._][0-9]+)*)(?P<rest>.*)$", re.DOTALL)
# semver pre-release identifiers, for suffixes PEP 440 cannot read
_SEMVER_PRE_RE = re.compile(r"^-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)(?:\+[0-9A-Za-z.-]+)?\Z")
_MAX_RELEASE_PARTS = 6  # longer dotted numbers are dates/IPs/hashes, not versions worth ordering
_MAX_TAG_LEN = 255  # longer tags are not versions; and int() refuses numbers of over 4,300 digits


@dataclass(frozen=True)
class Version:
    """One parsed tag. ``key`` orders versions; equal keys are broken by the tag text."""

    tag: str
    prefix: str
    release: tuple[int, ...]
    prerelease: bool
    key: tuple = field(repr=False)

    @property
    def major(self) -> int:
        return self.release[0]

    def __lt__(self, other: Version) -> bool:
        return (self.key, self.tag) < (other.key, other.tag)


_FINAL_RE = re.compile(r"^([^0-9]*)([0-9]+(?:\.[0-9]+)*)\Z")  # the common case: v1.2.3, release-1.10
_FINAL = (-1, "")  # the detail of a plain final release (no post-release, no local label)

_Parsed = tuple  # (prefix, release, prerelease, key)


def _trim(parts: tuple[int, ...]) -> tuple[int, ...]:
    while len(parts) > 1 and parts[-1] == 0:  # 1.2 and 1.2.0 are the same version
        parts = parts[:-1]
    return parts


def _parse(tag: str) -> _Parsed | None:
    """(prefix, release, prerelease, key) of *tag*, or None. Cheap for plain numeric tags, which are most
    of a remote's thousands."""
    if len(tag) > _MAX_TAG_LEN or not tag.isascii():  # a version tag is ASCII (no full-width digits)
        return None
    m = _FINAL_RE.match(tag)
    if m is not None:
        parts = tuple(map(int, m.group(2).split(".")))
        if len(parts) > _MAX_RELEASE_PARTS:
            return None
        release = _trim(parts)
        return (m.group(1), release, False, (release, 1, 0, _FINAL))
    m = _TAG_RE.match(tag.strip())
    if not m:
        return None
    prefix, release_text, rest = m.group("prefix"), m.group("release"), m.group("rest")
    parts = tuple(int(p) for p in release_text.replace("_", ".").split("."))
    if len(parts) > _MAX_RELEASE_PARTS:
        return None
    release = _trim(parts)
    if not rest:
        return (prefix, release, False, (release, 1, 0, _FINAL))
    # imported here: most tags never get this far, and check's start-up time counts
    from packaging.version import InvalidVersion
    from packaging.version import Version as _PepVersion

    numeric = ".".join(str(p) for p in parts)
    try:
        pep = _PepVersion(numeric + rest)
    except InvalidVersion:
        pep = None
    if pep is not None:
        if pep.is_prerelease:
            # among pre-releases of one release, packaging orders dev < a < b < rc
            return (prefix, release, True, (release, 0, 0, pep))
        # a final release, then its post-releases; a local label (+build) only breaks ties
        return (prefix, release, False, (release, 1, 0, (pep.post if pep.post is not None else -1,
                                                          str(pep.local or ""))))
    sm = _SEMVER_PRE_RE.match(rest)
    if sm is None:
        return None
    # semver 11: numeric identifiers compare numerically and sort below alphanumeric ones
    ids = tuple((0, int(i), "") if i.isdigit() else (1, 0, i.lower()) for i in sm.group("pre").split("."))
    # below the release it precedes; after PEP 440 pre-releases of it (kind 1), an arbitrary but total order
    return (prefix, release, True, (release, 0, 1, ids))


def parse_version(tag: str) -> Version | None:
    """Parse a tag name into a :class:`Version`, or None when it cannot be ordered. Never raises."""
    p = _parse(tag)
    if p is None:
        return None
    return Version(tag=tag, prefix=p[0], release=p[1], prerelease=p[2], key=p[3])


def order_key(v: Version) -> tuple:
    """Sort key: versions as versions, ties broken by the tag text (so the result is stable)."""
    return (v.key, v.tag)


def is_newer(a: Version, b: Version) -> bool:
    """True when *a* is a strictly newer version than *b* (the tag text does not count)."""
    return a.key > b.key


class Selection(NamedTuple):
    """What :func:`select` chose: the newest acceptable tag and, under ``major: manual``, a newer major."""

    latest: Version | None
    major_available: Version | None = None
    skipped: tuple[str, ...] = ()


def _newest_plain(items: list[tuple[list[str], str]]) -> tuple | None:
    """``(key, tag)``, as :func:`_parse` keys and :func:`select` compare them, of the newest of *items*:
    plain numeric tags (``v1.2.3``) as ``(release parts as text, tag)``.

    Ranked one release part at a time, over the tags still in the running: on a remote's thousands
    of tags that is a few ints per tag instead of a tuple, a key and two comparisons each (select
    takes ~2 ms instead of ~4 per 1,000 tags). A missing part counts as 0 (``1.2`` is ``1.2.0``, as
    :func:`_trim` makes it), and among equal releases the greater tag text wins, as in select's
    ``(key, tag)`` order.
    """
    if not items:
        return None
    depth = max(len(parts) for parts, _ in items)
    for i in range(depth):
        if len(items) == 1:
            break
        values = [int(parts[i]) if i < len(parts) else 0 for parts, _ in items]
        top = max(values)
        items = [it for it, v in zip(items, values, strict=True) if v == top]
    parts, tag = max(items, key=lambda it: it[1])
    release = _trim(tuple(map(int, parts)))
    return ((release, 1, 0, _FINAL), tag)


def select(tags: Iterable[str], *, current: str | None = None, include: re.Pattern[str] | None = None,
           exclude: re.Pattern[str] | None = None, prereleases: bool = False,
           major: str = "manual", prerelease_tags: Iterable[str] = ()) -> Selection:
    """Choose the newest tag.

    ``include``/``exclude`` filter first; pre-releases (by their text, or listed in
    *prerelease_tags*, e.g. GitHub's flag) are dropped unless *prereleases*, and so are tags whose
    first number reads as a date (``nightly-20241215``) unless the pin is dated too. Tag families
    (see :func:`_family`): with a parseable *current*, only tags of the pin's family compete. Without
    one, when any tag of the ``v``/bare family (``v1.29.0``, ``V1.2``, ``1.3.0``) is left after that
    filtering, the newest of that family is taken; only when none is do all families compete, as
    ``release-1.2`` and ``release-1.10`` of a repo that tags nothing else. So ``plugin-3.0``,
    ``go1.22`` or ``tools/v5.0`` beside ``v1.29.0`` is never the newest of an unpinned subsystem.
    Under ``major="manual"`` with a parseable *current*, ``latest`` stays within current's major and
    the newest tag of a higher major is returned as ``major_available``; ``major="auto"`` takes the
    newest overall; without a pin ``major_available`` is None. Tags that cannot be ordered are listed
    in ``skipped``, whatever their family. Never raises for odd tag names.
    """
    flagged = set(prerelease_tags)
    pinned = parse_version(current) if current else None
    # a pin names its tag family: v2.10.24 is compared with v* and bare tags, not with nightly-20241215
    # or release-1.2 (another line of tags whose numbers mean something else)
    family = _family(pinned.prefix) if pinned is not None else None
    # a date for a first number (nightly-20241215) stamps a build, it is no release's major: without
    # a pin of that form it would outrank every release
    dates = pinned is not None and _dated(pinned.major)
    cur = pinned if major == "manual" else None
    cur_major = cur.major if cur is not None else None
    # plain numeric tags (most of a remote's thousands) are ranked together by _newest_plain; the
    # others are parsed one by one, keeping the (key, tag) of the best so far. Without a pin, tags of
    # another family than v/bare (plugin-3.0, go1.22, tools/v5.0) go to other_plain and other instead:
    # they count only when no v/bare tag is left
    plain: list[tuple[list[str], str]] = []
    other_plain: list[tuple[list[str], str]] = []
    newest: tuple | None = None
    other: tuple | None = None
    ours = _V_PREFIXES if family is None else None  # with a pin, every tag left is of its family
    in_major: tuple | None = None
    skipped: list[str] = []
    final = _FINAL_RE.match
    for t in tags:
        if include is not None and not include.search(t):
            continue
        if exclude is not None and exclude.search(t):
            continue
        if len(t) > _MAX_TAG_LEN or not t.isascii():  # as _parse refuses them
            skipped.append(t)
            continue
        m = final(t)
        if family is not None and _family(m[1] if m is not None else _prefix(t)) != family:
            continue
        if m is not None:  # _parse's first case
            parts = m[2].split(".")
            if len(parts) > _MAX_RELEASE_PARTS:
                skipped.append(t)
            elif not dates and _dated(int(parts[0])):
                continue
            elif prereleases or t not in flagged:
                if ours is None or m[1] in ours:
                    plain.append((parts, t))
                else:
                    other_plain.append((parts, t))
            continue
        p = _parse(t)
        if p is None:
            skipped.append(t)
            continue
        if not dates and _dated(p[1][0]):
            continue
        if not prereleases and (p[2] or t in flagged):
            continue
        k = (p[3], t)
        if ours is not None and _prefix(t) not in ours:
            if other is None or k > other:
                other = k
            continue
        if newest is None or k > newest:
            newest = k
        if cur_major is not None and p[1][0] <= cur_major and (in_major is None or k > in_major):
            in_major = k
    if not plain and newest is None:  # no v/bare tag is left: every family competes (pinned, both are empty)
        plain, newest = other_plain, other
    best = _newest_plain(plain)
    if best is not None and (newest is None or best > newest):
        newest = best
    if cur_major is not None and plain:
        if best is not None and best[0][0][0] <= cur_major:  # the newest plain tag is within the major
            best_in = best
        else:
            best_in = _newest_plain([it for it in plain if int(it[0][0]) <= cur_major])
        if best_in is not None and (in_major is None or best_in > in_major):
            in_major = best_in
    latest = parse_version(newest[1]) if newest else None
    if latest is None or cur_major is None:
        return Selection(latest, None, tuple(skipped))
    major_available = latest if latest.major > cur_major else None
    return Selection(parse_version(in_major[1]) if in_major else None, major_available, tuple(skipped))


def _family(prefix: str) -> str:
    """A tag prefix with a trailing ``v`` dropped: ``v``, ``V`` and no prefix are one family;
    ``nats-server-v`` and ``nats-server-`` another."""
    p = prefix.lower()
    return p[:-1] if p.endswith("v") else p


# the prefixes of the family _family names "" (v1.29.0, V1.2, 1.3.0): the one upstreams tag their
# releases in, preferred by select when there is no pin
_V_PREFIXES = frozenset({"", "v", "V"})


def _dated(number: int) -> bool:
    """Whether a tag's first number reads as a date, 19xxxxxx or 20xxxxxx (``nightly-20241215``)."""
    return 19000000 <= number <= 20999999


def _prefix(tag: str) -> str:
    m = _TAG_RE.match(tag)
    return m.group("prefix") if m else tag


def held_back(tag: str, current: str | None, *, major: str = "manual") -> str | None:
    """Why an announced *tag* must not replace the pinned *current*, or None when it may.

    It must be strictly newer than the pin (an upstream tagging a backport such as ``v2.9.1`` after
    ``v2.10.0`` is no update), and under ``major="manual"`` within the pin's major: a new major is
    reported by ``check`` and taken only on request (``build --allow-major``). Without a pin, or
    when either side cannot be ordered, only the pin itself is refused.
    """
    if not current:
        return None
    c, v = parse_version(current), parse_version(tag)
    if c is None or v is None:
        return f"{tag} is the pinned version" if tag == current else None
    if not is_newer(v, c):
        return f"{tag} is not newer than the pinned {current}"
    if major == "manual" and new_major(tag, current):
        return f"{tag} is a new major over the pinned {current} (major: manual)"
    return None


def later(tag: str, other: str) -> bool:
    """Whether *tag* is a newer version than *other* (False when either cannot be ordered)."""
    a, b = parse_version(tag), parse_version(other)
    return a is not None and b is not None and is_newer(a, b)


def in_pin_form(version: str, pin: str | None) -> str:
    """*version* written as *pin* writes versions, ``v`` prefix and all: ``v11.6.0`` for a pin
    ``11.4.0`` is ``11.6.0`` (plat-telemetry's grafana pins v-less and its Taskfile clones
    ``v{{.GF_VERSION}}``), ``2.10.26`` for a pin ``v2.10.24`` is ``v2.10.26``. *version* as it is when
    either is not a version or they differ in more than that prefix."""
    if re.fullmatch(r"[0-9a-f]{7,40}", version):  # a commit, even an all-digit one, is no version
        return version
    v, p = parse_version(version), parse_version(pin or "")
    if v is None or p is None or v.prefix not in ("", "v") or p.prefix not in ("", "v") or v.prefix == p.prefix:
        return version
    return version[1:] if v.prefix else "v" + version


def new_major(tag: str, current: str | None) -> bool:
    """Whether *tag* is of a higher major version than *current* (False when either cannot be ordered)."""
    c, v = parse_version(current or ""), parse_version(tag)
    return c is not None and v is not None and v.major > c.major


def update_available(current: str | None, latest: str | None) -> bool:
    """Whether *latest* is newer than the pinned *current*.

    No pin counts as out of date (nothing is known to be installed); an unparseable pin is out of date
    when its text differs from *latest*.
    """
    if latest is None:
        return False
    if not current:
        return True
    c, latest_v = parse_version(current), parse_version(latest)
    if c is None or latest_v is None:
        return current != latest
    return is_newer(latest_v, c)
