import subprocess
import sys
import textwrap

import pytest

from abot import registry
from abot.errors import AbotError
from abot.registry import Registry, call_with_options


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path with entry points in group abot.optimizers, as `pip install` would leave."""
    (tmp_path / "fakeplugin_mod.py").write_text(textwrap.dedent('''
        def lion(weight_decay=0.0, b1=0.9):
            """Lion: sign of interpolated momentum."""
            return ("lion", weight_decay, b1)
        NOT_CALLABLE = 3
        '''))
    (tmp_path / "broken_mod.py").write_text("raise ImportError('missing dependency xyz')\n")
    info = tmp_path / "fakeplugin-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugin\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        "[abot.optimizers]\nlion = fakeplugin_mod:lion\nadamw = fakeplugin_mod:lion\n"
        "broken = broken_mod:thing\nconstant = fakeplugin_mod:NOT_CALLABLE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_are_listed_with_their_source():
    names = registry.optimizers.names()
    assert {"adamw", "muon", "muon_adamw", "sgd"} <= set(names)
    entry = registry.optimizers.entry("adamw")
    assert entry.source == "abot" and entry.summary


def test_unknown_name_suggests_the_closest_and_lists_all():
    with pytest.raises(AbotError) as err:
        registry.optimizers.get("muon_adam", "train.optimizer")
    msg = str(err.value)
    assert "did you mean 'muon_adamw'?" in msg and "(train.optimizer)" in msg and "sgd" in msg


def test_entry_point_plugins_load_and_broken_ones_warn(fake_plugin):
    reg = Registry("optimizers", {"adamw": "abot.optim.adamw:adamw"})
    with pytest.warns(UserWarning) as caught:
        entries = {e.name: e for e in reg.entries()}
    messages = " | ".join(str(w.message) for w in caught)
    assert entries["lion"].source == "fakeplugin" and entries["lion"].version == "1.2.3"
    assert entries["lion"].summary == "Lion: sign of interpolated momentum."
    # A clash never replaces the built-in.
    assert entries["adamw"].source == "abot" and "clashes" in messages and "'fakeplugin'" in messages
    assert "broken" not in entries and "missing dependency xyz" in messages
    assert "constant" not in entries and "not a callable" in messages


def test_options_are_checked_against_the_signature():
    def lion(weight_decay=0.0, b1=0.9):
        return weight_decay, b1

    assert call_with_options(lion, {"b1": 0.5}, "train.optimizer_args", weight_decay=0.1, momentum=0.9) == (0.1, 0.5)
    with pytest.raises(AbotError, match="unknown option 'b11'.*did you mean 'b1'"):
        call_with_options(lion, {"b11": 0.5}, "train.optimizer_args")


def test_bad_option_values_become_clear_errors():
    with pytest.raises(AbotError, match="train.optimizer_args: muon rejected its options"):
        call_with_options(registry.optimizers.get("muon"), {"momentum": 1.5}, "train.optimizer_args")


def test_cli_lists_optimizers_and_suggests_kinds():
    out = subprocess.run([sys.executable, "-m", "abot", "list", "optimizers"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in ("adamw", "muon", "muon_adamw", "sgd"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "abot", "list", "optimisers"], capture_output=True, text=True)
    assert bad.returncode == 2 and "did you mean 'optimizers'?" in bad.stdout
