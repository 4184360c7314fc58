"""Finding, loading and calling plugins — lazily, and naming the culprit when one fails.

Loading happens in three steps, each as late as possible:

1. **Discovery** (first time anything asks what plugins provide): every entry point of the
   ``tokopt`` group is loaded, which imports the plugin's *manifest* module — required to
   be light (see :mod:`tokopt.plugins.hookspecs`).  Its API version is checked.
2. **Registration** (same moment): the ``tokopt_register_*`` hooks answer with names and
   ``"module:Attribute"`` references.  Nothing heavy is imported; listing passes costs the
   manifests only.
3. **Resolution** (when one name is used): that one reference is imported and checked,
   and the plugin's ops are installed so graphs using them can be verified and run.

A plugin that fails in step 1 or 2 is set aside (logged, and listed by
:meth:`PluginManager.failures`) so one broken package does not take the tool down; asking
for a name nobody provides then raises a ``PluginError`` that names the broken plugins.
Failures in step 3, in observer hooks, or inside a plugin's pass or backend (see
:func:`plugin_guard`) raise ``PluginError`` naming the plugin at once.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from tokopt.errors import PluginError, TokoptError
from tokopt.plugins import hookspecs
from tokopt.plugins.hookspecs import PLUGIN_API_VERSION, PROJECT_NAME, SUPPORTED_PLUGIN_API_VERSIONS

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tokopt"
DISABLE_ENV = "TOKOPT_DISABLE_PLUGINS"
BUILTIN = "tokopt"  # the value of ``plugin`` on built-in passes and backends

KINDS = {  # kind -> registration hook
    "pass": "tokopt_register_passes",
    "backend": "tokopt_register_backends",
    "frontend": "tokopt_register_frontends",
}

#: Names built into tokopt, per kind.  The registries above this layer reserve theirs with
#: :func:`tokopt.plugins.reserve_builtin_names` when they are imported: plugins may add
#: names, not replace built-ins.
BUILTIN_NAMES: dict[str, set[str]] = {kind: set() for kind in KINDS}


@dataclass
class PluginInfo:
    """One loaded plugin.  ``name`` is its distribution name (what errors and reports show)."""

    name: str
    module: Any
    entry_point: str | None = None  # "ep_name = module" for discovered plugins
    version: str | None = None
    api_versions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Provided:
    """A name a plugin provides, not yet imported."""

    kind: str
    name: str
    ref: Any  # "module:Attribute" or the object itself
    plugin: str


def import_reference(ref: Any, plugin: str, what: str) -> Any:
    """``"pkg.mod:Attr"`` → the object (objects pass through); errors name ``plugin``."""
    if not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise PluginError(f"plugin {plugin!r}: {what} reference {ref!r} is not of the form 'module:Attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - any failure importing plugin code is the plugin's
        raise PluginError(f"plugin {plugin!r}: cannot import {what} {ref!r}: {type(exc).__name__}: {exc}") from exc
    return obj


@contextlib.contextmanager
def plugin_guard(plugin: str, what: str) -> Iterator[None]:
    """Turn a crash inside plugin code into a ``PluginError`` naming the plugin.

    ``TokoptError`` subclasses raised by the plugin (a bad option, an unmet precondition)
    pass through unchanged: they are deliberate messages for the user.  For built-in code
    (``plugin == "tokopt"``) nothing is wrapped, so tokopt's own bugs keep their traceback.
    """
    try:
        yield
    except TokoptError:
        raise
    except Exception as exc:
        if plugin == BUILTIN:
            raise
        err = PluginError(f"plugin {plugin!r} crashed in {what}: {type(exc).__name__}: {exc}")
        err.plugin = plugin  # type: ignore[attr-defined]
        raise err from exc


def _disabled() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def _dist_name(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return (dist.name if dist is not None and dist.name else ep.name) or ep.value


class PluginManager:
    """Discovers plugins through entry points and answers what they provide."""

    def __init__(self, group: str = ENTRY_POINT_GROUP, discover: bool = True) -> None:
        self.group = group
        self._discover = discover
        self._pm = pluggy.PluginManager(PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._discovered = False
        self.plugins: dict[str, PluginInfo] = {}
        self._failures: dict[str, str] = {}
        self._provided: dict[str, dict[str, Provided]] | None = None
        self._ops_installed: set[str] = set()

    # -- discovery ----------------------------------------------------------------------
    def discover(self) -> None:
        """Import every entry point's manifest once (cheap by contract)."""
        if self._discovered:
            return
        self._discovered = True
        if not self._discover:
            return
        disabled = _disabled()
        seen: set[tuple[str, str, str]] = set()
        for ep in sorted(entry_points(group=self.group), key=lambda e: (_dist_name(e), e.name)):
            dist = _dist_name(ep)
            key = (dist, ep.name, ep.value)
            if key in seen:  # the same distribution found twice on sys.path
                continue
            seen.add(key)
            if "all" in disabled or dist.lower() in disabled or ep.name.lower() in disabled:
                log.info("plugin %s disabled by %s", dist, DISABLE_ENV)
                continue
            label = f"{ep.name} = {ep.value}"
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not take tokopt down
                self._fail(dist, f"cannot import its entry point ({label}): {type(exc).__name__}: {exc}")
                continue
            version = getattr(getattr(ep, "dist", None), "version", None)
            name = dist if dist not in self.plugins else f"{dist}:{ep.name}"  # a second entry point of one dist
            try:
                self.register(module, name, entry_point=label, version=version)
            except PluginError as exc:
                self._fail(name, str(exc))

    def _fail(self, plugin: str, message: str) -> None:
        log.warning("plugin %r is disabled: %s", plugin, message)
        self._failures[plugin] = message
        if self._pm.has_plugin(plugin):
            self._pm.unregister(name=plugin)
        self.plugins.pop(plugin, None)
        self._provided = None

    def register(self, module: Any, name: str, entry_point: str | None = None, version: str | None = None) -> None:
        """Register a plugin object (a manifest module, or any object with hook functions).

        Entry points call this through :meth:`discover`; tests and applications may call it
        directly to add a plugin in-process.  Raises ``PluginError`` naming ``name``.
        """
        self.discover()
        if name in self.plugins or name == BUILTIN:
            raise PluginError(f"a plugin named {name!r} is already registered")
        try:
            self._pm.register(module, name=name)
            self._pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - pluggy's validation errors and ValueError
            if self._pm.has_plugin(name):
                self._pm.unregister(name=name)
            raise PluginError(f"plugin {name!r} does not fit the tokopt hook API: {exc}") from exc
        info = PluginInfo(name, module, entry_point, version)
        self.plugins[name] = info
        try:
            info.api_versions = self._api_versions(name)
        except PluginError:
            self._pm.unregister(name=name)
            del self.plugins[name]
            raise
        self._provided = None

    def unregister(self, name: str) -> None:
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
        self.plugins.pop(name, None)
        self._failures.pop(name, None)
        self._provided = None

    def _api_versions(self, name: str) -> list[int]:
        answers = self.call("tokopt_plugin_api_version", plugin=name)
        if not answers:
            log.warning("plugin %r does not declare tokopt_plugin_api_version; assuming %d", name, PLUGIN_API_VERSION)
            return [PLUGIN_API_VERSION]
        declared = answers[0][1]
        versions = [declared] if isinstance(declared, int) else list(declared or [])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in versions) or not versions:
            raise PluginError(f"plugin {name!r}: tokopt_plugin_api_version returned {declared!r}, expected an int")
        if not SUPPORTED_PLUGIN_API_VERSIONS.intersection(versions):
            supported = ", ".join(map(str, sorted(SUPPORTED_PLUGIN_API_VERSIONS)))
            raise PluginError(
                f"plugin {name!r} targets tokopt plugin API version {', '.join(map(str, versions))}, but this tokopt "
                f"speaks version {supported}; upgrade the plugin or tokopt (or set {DISABLE_ENV}={name})")
        return versions

    # -- calling hooks --------------------------------------------------------------------
    def call(self, hook: str, plugin: str | None = None, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call ``hook`` on each plugin separately; returns ``[(plugin, result), …]`` (non-None).

        Plugins are called in registration order.  A crash becomes a ``PluginError`` naming
        the plugin and the hook; a ``TokoptError`` raised on purpose passes through.
        """
        self.discover()
        results: list[tuple[str, Any]] = []
        impls = getattr(self._pm.hook, hook).get_hookimpls()
        for impl in impls:
            if plugin is not None and impl.plugin_name != plugin:
                continue
            with plugin_guard(impl.plugin_name, f"hook {hook}"):
                result = impl.function(*[kwargs[arg] for arg in impl.argnames])
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    # -- what plugins provide ----------------------------------------------------------------
    def provided(self, kind: str) -> dict[str, Provided]:
        """Names of ``kind`` ("pass", "backend", "frontend") provided by plugins, not imported."""
        if self._provided is None:
            self._provided = self._collect()
        return self._provided[kind]

    def _collect(self) -> dict[str, dict[str, Provided]]:
        self.discover()
        builtin = BUILTIN_NAMES
        out: dict[str, dict[str, Provided]] = {kind: {} for kind in KINDS}
        for plugin in list(self.plugins):
            mine: dict[str, dict[str, Provided]] = {kind: {} for kind in KINDS}
            try:
                for kind, hook in KINDS.items():
                    for _, answer in self.call(hook, plugin=plugin):
                        if not isinstance(answer, dict):
                            raise PluginError(f"plugin {plugin!r}: {hook} returned {type(answer).__name__}, "
                                              "expected a dict of name -> 'module:Attribute'")
                        for name, ref in answer.items():
                            if not isinstance(name, str) or not name:
                                raise PluginError(f"plugin {plugin!r}: {hook} returned a non-string name {name!r}")
                            if name in builtin[kind]:
                                raise PluginError(f"plugin {plugin!r} provides {kind} {name!r}, which is built into "
                                                  "tokopt; plugins may add names, not replace built-ins")
                            other = out[kind].get(name)
                            if other is not None:
                                raise PluginError(f"plugin {plugin!r} provides {kind} {name!r}, which plugin "
                                                  f"{other.plugin!r} already provides")
                            mine[kind][name] = Provided(kind, name, ref, plugin)
            except PluginError as exc:
                self._fail(plugin, str(exc))
                continue
            for kind in KINDS:
                out[kind].update(mine[kind])
        return out

    def forget_provided(self) -> None:
        """Collect the plugins' names again on next use (the reserved built-in names changed)."""
        self._provided = None

    def failures(self) -> dict[str, str]:
        """Plugins that were set aside: distribution name -> why."""
        self.discover()
        if self._provided is None:
            self._provided = self._collect()
        return dict(self._failures)

    def missing(self, kind: str, name: str) -> PluginError | None:
        """A ``PluginError`` to raise for an unknown ``name`` when broken plugins might have provided it."""
        failures = self.failures()
        if not failures:
            return None
        broken = "; ".join(f"plugin {p!r}: {why}" for p, why in sorted(failures.items()))
        return PluginError(f"unknown {kind} {name!r}; it may come from a plugin that failed to load — {broken}")

    def resolve(self, kind: str, name: str) -> tuple[Any, str] | None:
        """Import the object behind plugin-provided ``name``: (object, plugin), or None if no plugin has it."""
        entry = self.provided(kind).get(name)
        if entry is None:
            return None
        obj = import_reference(entry.ref, entry.plugin, f"{kind} {name!r}")
        self.install_ops(entry.plugin)
        return obj, entry.plugin

    # -- ops ----------------------------------------------------------------------------
    def install_ops(self, plugin: str | None = None) -> None:
        """Install the ops of ``plugin`` (or of every plugin) into the IR and the torch kernels."""
        from tokopt.plugins.ops import OpDefinition, install_op

        self.discover()
        names = [plugin] if plugin is not None else list(self.plugins)
        for name in names:
            if name in self._ops_installed or name not in self.plugins:
                continue
            self._ops_installed.add(name)
            for _, answer in self.call("tokopt_register_ops", plugin=name):
                for ref in answer if isinstance(answer, list | tuple) else [answer]:
                    definition = import_reference(ref, name, "op")
                    if not isinstance(definition, OpDefinition):
                        raise PluginError(f"plugin {name!r}: op reference {ref!r} is a {type(definition).__name__}, "
                                          "expected tokopt.plugins.ops.OpDefinition")
                    install_op(definition, name)

    def describe(self) -> list[dict[str, Any]]:
        """Every plugin with what it provides, and every failed one with why (for ``tokopt plugins``/doctor)."""
        failures = self.failures()
        rows = []
        for name, info in sorted(self.plugins.items()):
            rows.append({
                "name": name, "version": info.version, "entry_point": info.entry_point, "ok": True, "error": None,
                "api_versions": info.api_versions,
                "provides": {kind: sorted(n for n, p in self.provided(kind).items() if p.plugin == name)
                             for kind in KINDS},
            })
        for name, why in sorted(failures.items()):
            rows.append({"name": name, "version": None, "entry_point": None, "ok": False, "error": why,
                         "api_versions": [], "provides": {kind: [] for kind in KINDS}})
        return rows
