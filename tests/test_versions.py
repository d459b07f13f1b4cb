"""Version tags ordered as versions: prefixes, pre-releases, odd tags, include/exclude, majors."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sync_tools.versions import held_back, order_key, parse_version, select, update_available


def newest(tags, **kw):
    sel = select(tags, **kw)
    return sel.latest.tag if sel.latest else None


def ordered(tags):
    return [v.tag for v in sorted((parse_version(t) for t in tags), key=order_key)]


def test_numbers_order_as_numbers_not_text():
    assert newest(["release-1.2", "release-1.10", "release-1.9"]) == "release-1.10"
    assert newest(["v0.9.0", "v0.10.0", "v0.1.0"]) == "v0.10.0"
    assert newest(["2.9", "2.10.1", "2.10"]) == "2.10.1"


def test_prefixes_are_tolerated_and_ignored_for_ordering():
    assert parse_version("v2.10.24").release == (2, 10, 24)
    assert parse_version("nats-server-v2.10.24").prefix == "nats-server-v"
    assert parse_version("go1.21.5").release == (1, 21, 5)
    assert newest(["v1.2.0", "1.3.0"]) == "1.3.0"


def test_full_ordering_with_prereleases_and_post_releases():
    tags = ["v2.11.0", "v2.11.0-RC.1", "v2.11.0-rc.2", "v2.11.0-beta.3", "v2.11.0-alpha", "v2.10.24",
            "v2.11.0.post1", "v2.11.0.dev1", "v2.11.1"]
    shuffled = tags[:]
    random.Random(4).shuffle(shuffled)
    assert ordered(shuffled) == ["v2.10.24", "v2.11.0.dev1", "v2.11.0-alpha", "v2.11.0-beta.3",
                                 "v2.11.0-RC.1", "v2.11.0-rc.2", "v2.11.0", "v2.11.0.post1", "v2.11.1"]


def test_non_pep440_rc_tag_is_a_prerelease():
    v = parse_version("v2.11.0-RC.1")
    assert v is not None and v.prerelease
    assert not parse_version("v2.10.0").prerelease


def test_semver_prerelease_identifiers_packaging_cannot_read():
    # "alpha.beta" and "x.7.z.92" are semver pre-releases but not PEP 440: still ordered, below the release
    assert ordered(["1.0.0", "1.0.0-x.7.z.92", "1.0.0-alpha.beta", "0.9.9"]) == [
        "0.9.9", "1.0.0-alpha.beta", "1.0.0-x.7.z.92", "1.0.0"]
    assert parse_version("1.0.0-x.7.z.92").prerelease


def test_trailing_zeros_do_not_make_a_newer_version():
    assert not update_available("v1.2", "v1.2.0")
    assert not update_available("v1.2.0", "v1.2")


@pytest.mark.parametrize("tag", ["latest", "nightly", "", "   ", "v", "vX.Y", "1.2.3 with spaces", "1.2.3-",
                                 "1.2.3.4.5.6.7", "deadbeef-", "v1.2.3-\u00e9"])
def test_tags_that_cannot_be_ordered_are_skipped_not_fatal(tag):
    assert parse_version(tag) is None
    sel = select([tag, "v1.0.0"])
    assert sel.latest.tag == "v1.0.0"
    assert tag in sel.skipped


@given(st.text(max_size=40))
def test_parse_never_raises(text):
    v = parse_version(text)
    if v is not None:
        assert v.release and all(isinstance(p, int) for p in v.release)


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 300), st.integers(1, 300)), min_size=1, max_size=30,
                unique=True))
def test_newest_is_the_largest_number_triple(triples):
    tags = [f"v{a}.{b}.{c}" for a, b, c in triples]
    a, b, c = max(triples)
    assert newest(tags, major="auto") == f"v{a}.{b}.{c}"


def test_prereleases_left_out_unless_asked():
    tags = ["v2.10.24", "v2.10.25", "v2.11.0-RC.1"]
    assert newest(tags) == "v2.10.25"
    assert newest(tags, prereleases=True) == "v2.11.0-RC.1"


def test_prerelease_flag_from_elsewhere_counts():
    # GitHub can flag a release as a pre-release whatever its tag says
    assert newest(["v1.0.0", "v1.1.0"], prerelease_tags=["v1.1.0"]) == "v1.0.0"


def test_include_and_exclude_regexes():
    tags = ["v1.0.0", "v1.1.0", "helm-chart-9.0.0", "v1.2.0-fips"]
    assert newest(tags, include=re.compile(r"^v\d+\.\d+\.\d+$")) == "v1.1.0"
    assert newest(tags, exclude=re.compile(r"^helm-|fips")) == "v1.1.0"
    assert newest(tags, include=re.compile(r"^nothing")) is None


def test_major_manual_holds_back_a_new_major_and_reports_it():
    tags = ["v2.10.24", "v2.10.25", "v3.0.0", "v3.1.0"]
    sel = select(tags, current="v2.10.24", major="manual")
    assert sel.latest.tag == "v2.10.25"
    assert sel.major_available.tag == "v3.1.0"
    sel = select(tags, current="v2.10.24", major="auto")
    assert sel.latest.tag == "v3.1.0" and sel.major_available is None


def test_major_manual_without_a_newer_major_reports_none():
    sel = select(["v2.10.24", "v2.10.25"], current="v2.10.24")
    assert sel.latest.tag == "v2.10.25" and sel.major_available is None


def test_major_manual_with_only_newer_majors():
    sel = select(["v3.0.0"], current="v2.10.24")
    assert sel.latest is None and sel.major_available.tag == "v3.0.0"


def test_major_manual_without_a_pin_takes_the_newest():
    assert newest(["v2.0.0", "v3.0.0"], current=None) == "v3.0.0"


@pytest.mark.parametrize("tag, current, major, refused", [
    ("v2.10.25", "v2.10.24", "manual", None),
    ("v2.10.24", "v2.10.24", "manual", "not newer"),
    ("v2.9.1", "v2.10.0", "manual", "not newer"),          # a backport tagged after the pin
    ("v2.10.24.0", "v2.10.24", "manual", "not newer"),     # the same version written longer
    ("v3.0.0", "v2.10.24", "manual", "new major"),
    ("v3.0.0", "v2.10.24", "auto", None),
    ("v2.11.0-rc.1", "v2.10.24", "manual", None),          # newer; whether prereleases count is the caller's
    ("v1.0.0", None, "manual", None),                      # no pin: anything goes
    ("nightly", "nightly", "manual", "pinned version"),    # cannot be ordered: only the pin itself is refused
    ("nightly", "v1.0.0", "manual", None),
])
def test_held_back(tag, current, major, refused):
    reason = held_back(tag, current, major=major)
    assert (reason is None) if refused is None else (refused in reason), reason


def test_update_available():
    assert update_available("v2.10.24", "v2.10.25")
    assert not update_available("v2.10.25", "v2.10.25")
    assert not update_available("v2.10.26", "v2.10.25")  # pinned ahead of upstream: nothing to do
    assert update_available("2.10.24", "v2.10.25")
    assert not update_available("v2.10.24", None)
    assert update_available(None, "v1.0.0")  # nothing pinned: not known to be at the newest
    assert update_available("weird-pin", "v1.0.0")
    assert not update_available("weird-pin", "weird-pin")


def test_equal_versions_with_different_text_pick_stably():
    assert newest(["1.0.0", "v1.0.0"]) == newest(["v1.0.0", "1.0.0"])


def _reference_select(tags, *, current=None, prereleases=False, major="manual", prerelease_tags=()):
    """select's answer the plain way: parse every tag into a Version, then max() by (key, tag)."""
    flagged = set(prerelease_tags)
    cur = parse_version(current) if current and major == "manual" else None
    pin = parse_version(current) if current else None

    def dated(v) -> bool:  # a first number that reads as a date (nightly-20241215)
        return 19000000 <= v.major <= 20999999

    def family(prefix: str) -> str:  # v, V and no prefix are one family of tags
        return prefix.lower().removesuffix("v")

    kept, skipped = [], []
    for t in tags:
        if len(t) > 255 or not t.isascii():
            skipped.append(t)
            continue
        if pin is not None and family(re.match(r"[^0-9]*", t, re.S).group()) != family(pin.prefix):
            continue  # another family of tags than the pin's (nightly-20241215 beside v2.10.24)
        v = parse_version(t)
        if v is None:
            skipped.append(t)
        elif dated(v) and not (pin is not None and dated(pin)):
            continue  # a build's date, no release's major, unless the pin is dated too
        elif prereleases or not (v.prerelease or t in flagged):
            kept.append(v)
    if pin is None:  # no pin: the v/bare family's tags alone, when any is left
        ours = [v for v in kept if family(re.match(r"[^0-9]*", v.tag, re.S).group()) == ""]
        kept = ours or kept
    best = max(kept, key=order_key, default=None)
    if best is None or cur is None:
        return (best and best.tag, None, tuple(skipped))
    within = max((v for v in kept if v.major <= cur.major), key=order_key, default=None)
    return (within and within.tag, best.tag if best.major > cur.major else None, tuple(skipped))


# few distinct numbers and short releases, so equal releases behind other text (1.2 / 1.2.0 / 01.2) are common
_number = st.sampled_from(["0", "1", "2", "00", "01", "10", "999", "2024", "20241215"])
_release = st.one_of(st.lists(_number, min_size=1, max_size=4), st.lists(_number, min_size=5, max_size=8)).map(".".join)
_tag = st.one_of(
    st.builds(lambda p, r: p + r, st.sampled_from(["", "v", "V", "release-", "go", "nats-server-v", "tools/v"]),
              _release),
    st.builds(lambda p, r, s: p + r + s, st.sampled_from(["", "v", "release-"]), _release,
              st.sampled_from(["-rc.1", "-RC.2", "-beta", "+build.5", ".post1", "-alpha.x.7", "x", "-"])),
    st.text(max_size=6),
)


@given(tags=st.lists(_tag, max_size=40), current=st.one_of(st.none(), _tag), prereleases=st.booleans(),
       major=st.sampled_from(["manual", "auto"]), flag=st.integers(0, 5))
@example(tags=["1.2.0", "v1.2", "0.9"], current=None, prereleases=False, major="auto", flag=0)
@example(tags=["v2.0", "release-2", "v1.10.0", "v1.10"], current="v1.0", prereleases=False, major="manual", flag=0)
@example(tags=["v1.29.0", "plugin-3.0", "release-4.1+build.5"], current=None, prereleases=False, major="manual", flag=0)
@example(tags=["v2.0.0-rc.1", "v20241215", "release-1.0", "go1.2"], current=None, prereleases=False, major="auto",
         flag=0)
def test_select_agrees_with_parsing_every_tag(tags, current, prereleases, major, flag):
    """select ranks plain numeric tags a release part at a time (fast on thousands of tags); the
    answer must be exactly what parsing every tag and taking the max gives: trailing zeros, leading
    zeros, equal releases behind other prefixes, flagged pre-releases, dates, the pin's major and,
    without a pin, the v/bare family first."""
    flagged = tags[::flag] if flag else []
    sel = select(tags, current=current, prereleases=prereleases, major=major, prerelease_tags=flagged)
    got = (sel.latest and sel.latest.tag, sel.major_available and sel.major_available.tag, sel.skipped)
    assert got == _reference_select(tags, current=current, prereleases=prereleases, major=major,
                                     prerelease_tags=flagged)


def test_a_pin_compares_only_with_its_own_family_of_tags():
    """nats-server's tags mix v2.x.y with other lines (nightly-20241215 and the like): a pin v2.10.24
    is compared with v* and bare tags only, or a date would be a 'new major'."""
    tags = ["v2.10.24", "v2.10.25", "nightly-20241215", "release-3.0.0", "2.11.0"]
    sel = select(tags, current="v2.10.24")
    assert sel.latest.tag == "2.11.0" and sel.major_available is None
    assert select(tags, current="release-2.0.0").major_available.tag == "release-3.0.0"
    assert select(tags, current="11.4.0", major="auto").latest.tag == "2.11.0"


def test_a_tag_with_a_huge_number_is_skipped_not_a_crash():
    """int() refuses a number of over 4,300 digits (ValueError): a hostile remote's tag must not sink
    the check (it did, in parse_version and select alike)."""
    huge = "9" * 5000
    tags = ["v1.0.0", f"v1.{huge}", f"v1.1.0-rc.{huge}", "v" + "1." * 200 + "0"]
    sel = select(tags)
    assert sel.latest.tag == "v1.0.0"
    assert set(sel.skipped) == set(tags[1:])
    assert all(parse_version(t) is None for t in tags[1:])
    assert newest(tags, prereleases=True, current="v1.0.0") == "v1.0.0"


@pytest.mark.parametrize("tag", ["v\uff11.\uff15.0", "v1.\u0665.0", "v\u0661.9.0", "\uff12.0.0"])
def test_digits_of_other_scripts_are_not_version_numbers(tag):
    # int() reads full-width and Arabic-Indic digits; a tag written with them is not a version here
    assert parse_version(tag) is None
    sel = select([tag, "v1.4.0"], current="v1.0.0")
    assert sel.latest.tag == "v1.4.0" and sel.major_available is None
    assert tag in sel.skipped


@pytest.mark.parametrize("tags, kw, expected", [
    pytest.param(["v1.29.0", "plugin-3.0"], {}, "v1.29.0", id="v-beside-plugin"),
    pytest.param(["v1.29.0", "plugin-3.0", "release-4.1", "go1.22", "tools/v5.0", "nightly-20241215"], {},
                 "v1.29.0", id="v-beside-many-lines"),
    pytest.param(["plugin-3.0", "1.29.0", "V1.28.0"], {}, "1.29.0", id="bare-and-V-are-the-v-family"),
    pytest.param(["v1.29.0+build.1", "plugin-3.0-rc.1", "release-4.1"], {"prereleases": True}, "v1.29.0+build.1",
                 id="v-tag-with-a-suffix"),
    pytest.param(["release-1.2", "release-1.10"], {}, "release-1.10", id="no-v-tag-one-line"),
    pytest.param(["release-1.2", "go1.22", "tools/v5.0"], {}, "tools/v5.0", id="no-v-tag-newest-of-all"),
    pytest.param(["1.2.0", "v1.3.0"], {}, "v1.3.0", id="bare-and-v-one-family"),
    pytest.param(["v2.0.0-rc.1", "tools-3.0"], {}, "tools-3.0", id="only-v-tag-a-dropped-prerelease"),
    pytest.param(["v2.0.0-rc.1", "tools-3.0"], {"prereleases": True}, "v2.0.0-rc.1", id="prerelease-taken"),
    pytest.param(["v1.9.0", "v2.0.0-rc.1", "tools-3.0"], {}, "v1.9.0", id="prerelease-dropped-v-release-left"),
    pytest.param(["v1.0.0", "plugin-2.0"], {"prerelease_tags": ["v1.0.0"]}, "plugin-2.0",
                 id="only-v-tag-flagged-prerelease"),
    pytest.param(["v20241215", "release-1.0"], {}, "release-1.0", id="only-v-tag-dated"),
    pytest.param(["v1.29.0", "plugin-3.0", "plugin-3.1"], {"include": re.compile(r"^plugin-")}, "plugin-3.1",
                 id="include-leaves-another-line"),
    pytest.param(["v1.29.0", "plugin-3.0"], {"exclude": re.compile(r"^v")}, "plugin-3.0",
                 id="exclude-leaves-another-line"),
    pytest.param(["v1.29.0", "plugin-3.0"], {"major": "auto"}, "v1.29.0", id="major-auto"),
])
def test_without_a_pin_the_v_family_wins_when_it_has_a_tag(tags, kw, expected):
    """Upstreams tag releases vX.Y.Z (nats-server, telegraf, grafana, liftbridge) and may carry other
    lines beside them (plugin-3.0, go1.22, tools/v5.0): without a pin, the newest acceptable tag of the
    v/bare family is taken when there is one; otherwise the newest of every family, as before."""
    for order in (tags, tags[::-1]):
        sel = select(order, **kw)
        assert sel.latest.tag == expected
        assert sel.major_available is None


def test_without_a_pin_other_families_unparseable_tags_are_still_skipped():
    sel = select(["v1.0.0", "plugin-2.0", "plugin-x", "latest"])
    assert sel.latest.tag == "v1.0.0" and set(sel.skipped) == {"plugin-x", "latest"}
