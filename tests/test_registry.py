"""The plugin registry: registration rules, suggestions, entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest

from embedlens.errors import PluginError, UnknownNameError
from embedlens.probes.base import Probe
from embedlens.registry import Registry, probes


class _Base:
    """The plugin base class of these tests."""


def test_register_get_and_duplicate():
    reg = Registry("widget", _Base)

    @reg.register("knob")
    class Knob(_Base):
        def __init__(self, size: int = 1):
            self.size = size

    assert reg.get("knob") is Knob and list(reg) == ["knob"]
    with pytest.raises(PluginError, match="'knob' is already registered"):
        reg.add("knob", type("Other", (_Base,), {}))
    with pytest.raises(UnknownNameError, match=r"Unknown widget 'nob'. Did you mean: knob\? Available: knob"):
        reg.get("nob")


def test_plugins_are_validated_when_registered():
    reg = Registry("widget", _Base, required=("run",))
    with pytest.raises(PluginError, match="must subclass"):
        reg.add("x", type("NotAWidget", (), {"run": lambda self: None}))
    with pytest.raises(PluginError, match=r"must define run\(\)"):
        reg.add("x", type("NoRun", (_Base,), {}))

    class Kw(_Base):
        def __init__(self, **kwargs: int):
            self.kwargs = kwargs

        def run(self):
            return self.kwargs

    with pytest.raises(PluginError, match=r"test_registry.*Kw: widget parameters must be explicit"):
        reg.add("kw", Kw)


def test_unknown_probe_suggests():
    with pytest.raises(UnknownNameError, match="Did you mean: embedding_lens"):
        probes.get("embeding_lens")


def test_entry_point_plugin_is_discovered(tmp_path, monkeypatch):
    """A throw-away installed distribution declares a probe through the entry-point group."""
    pkg = tmp_path / "thirdparty_probe.py"
    pkg.write_text(textwrap.dedent('''
        from embedlens.probes.base import Probe

        class NormProbe(Probe):
            """Norm of every visual token."""

            def __init__(self, layer: int = 0):
                self.layer = layer

            def sites(self, adapter):
                return []

            def update(self, adapter, batch, acts):
                return {}

            def result(self):
                return {}
    '''))
    dist = tmp_path / "thirdparty_probe-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-probe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[embedlens.probes]\nnorm_probe = thirdparty_probe:NormProbe\nbroken_probe = thirdparty_missing:Nope\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = probes.fresh()
    cls = reg.get("norm_probe")
    assert cls.__name__ == "NormProbe" and issubclass(cls, Probe)
    assert "norm_probe" in list(reg)
    assert "ModuleNotFoundError" in reg.failed["broken_probe"]
    with pytest.raises(PluginError, match="broken_probe' failed to load: ModuleNotFoundError"):
        reg.get("broken_probe")
    sys.modules.pop("thirdparty_probe", None)


def test_a_builtin_name_imports_its_module_alone_and_a_stale_index_falls_back_to_every_builtin(tmp_path, monkeypatch):
    """The stored index maps a built-in name to its module: a look-up imports that one (a plan's check imports only
    the plugins it names). Where the index names the wrong module, the look-up still finds the plugin."""
    pkg = tmp_path / "idx_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("BUILTINS = ('idx_plugins.a', 'idx_plugins.b')\n")
    (pkg / "reg.py").write_text(textwrap.dedent("""
        from embedlens.registry import Registry
        class Base: pass
        REG = Registry("widget", Base, builtins="idx_plugins", index="widgets")
    """))
    for mod, name in (("a", "knob"), ("b", "dial")):
        (pkg / f"{mod}.py").write_text(f"from idx_plugins.reg import REG, Base\n@REG.register({name!r})\nclass W(Base): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from idx_plugins.reg import REG

    REG._modules = {"knob": "idx_plugins.a", "dial": "idx_plugins.a"}  # as read from the index: dial's entry is stale
    try:
        assert REG.get("knob").__module__ == "idx_plugins.a"
        assert "idx_plugins.b" not in sys.modules
        assert REG.get("dial").__module__ == "idx_plugins.b"  # not in a: every built-in module, then found
        assert list(REG) == ["dial", "knob"]
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] == "idx_plugins"]:
            del sys.modules[m]

