"""Config YAML is parsed by libyaml where PyYAML has it, and says exactly what the pure-Python loader
says: the same values and lines for good files, the same errors (words and line) for bad ones."""

from __future__ import annotations

import pytest
import yaml

from sync_tools.config import _LineDict, _LineLoader, load_yaml
from sync_tools.errors import ConfigError

CASES = {
    "plain": "subsystems:\n  a:\n    upstream: https://example.org/a.git\n    current: v1.0.0\n",
    "scalars": "a: yes\nb: 010\nc: 1_000\nd: 2001-01-01\ne: ~\nf: 'x: y'\ng: [1, two]\n",
    "merge key": "base: &b {upstream: x}\nsubsystems:\n  a:\n    <<: *b\n    current: v1\n",
    "bom": "\ufeffa: 1\n",
    "empty": "",
    "bad indent": "subsystems:\n  a:\n    upstream: x\n   current: y\n",
    "tab": "subsystems:\n\ta: 1\n",
    "unclosed quote": "subsystems:\n  a:\n    upstream: \"x\n",
    "duplicate key": "subsystems:\n  a: {}\n  a: {}\n",
    "complex key": "? [a, b]\n: 1\n",
    "colon in value": "a: b: c\n",
    "control character": "a: \"\x07\"\n",
}


def outcome_of(read):  # type: ignore[no-untyped-def]
    try:
        data = read()
    except ConfigError as e:
        return ("error", str(e))
    lines = data.lines if isinstance(data, _LineDict) else None
    return ("ok", data, lines)


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_answer_as_the_pure_python_loader(tmp_path, name):
    path = tmp_path / "sync-tools.yaml"
    path.write_text(CASES[name], encoding="utf-8")

    def pure():  # the loader config used before libyaml: its verdict is the reference
        try:
            return yaml.load(CASES[name], Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
        except ConfigError as e:
            raise ConfigError(str(e).split(": ", 1)[-1], path=path, line=e.line) from e
        except yaml.YAMLError as e:
            from sync_tools.yamlhint import describe

            message, line = describe(e)  # the pure loader's problem and mark, with the hint for it
            raise ConfigError(message, path=path, line=line) from e

    assert outcome_of(lambda: load_yaml(path)) == outcome_of(pure)


def test_libyaml_is_used_where_pyyaml_has_it():
    from sync_tools.config import _FastLineLoader

    if not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML built without libyaml: the pure-Python loader is used")
    assert issubclass(_FastLineLoader, yaml.CSafeLoader)
