"""The plugin manager: pluggy loads and calls each plugin; tokopt adds names, blame and laziness.

pluggy does the mechanics: :meth:`pluggy.PluginManager.load_setuptools_entrypoints` imports
an entry point's manifest and registers it, pluggy validates its hook implementations
against :mod:`tokopt.plugins.hookspecs`, and every hook is called through pluggy's hook
relay (``pm.hook.tokopt_…(**kwargs)``).  What this module adds is what pluggy leaves to
its host:

- **blame**: every plugin lives in a pluggy manager of its own (:attr:`PluginInfo.pm`), so
  whatever a hook call returns or raises is that one plugin's.  pluggy's shared relay
  cannot say whose answer is whose, and its per-plugin view
  (:meth:`~pluggy.PluginManager.subset_hook_caller`) needs hashable plugin objects, which
  a ``SimpleNamespace`` of hook functions is not.  A broken plugin is set aside at load
  time; a crash later raises a ``PluginError`` naming it;
- **names**: pluggy knows a plugin by its entry-point name; users know the distribution
  they installed, so errors, reports and the ``plugin`` attribute of passes and backends
  say the distribution name;
- **laziness**, in three steps, each as late as possible:

  1. *Discovery* (first time anything asks what plugins provide): every entry point of the
     ``tokopt`` group is loaded — only the plugin's light *manifest* module (see
     :mod:`tokopt.plugins.hookspecs`) — and its API version is checked.
  2. *Registration* (same moment): the ``tokopt_register_*`` hooks answer with names and
     ``"module:Attribute"`` references.  Nothing heavy is imported.
  3. *Resolution* (when one name is used): that one reference is imported, and the
     plugin's ops are installed so graphs using them can be verified and run.

A plugin that fails in step 1 or 2 is set aside (logged, and listed by
:meth:`PluginManager.failures`) so one broken package does not take the tool down; asking
for a name nobody provides then raises a ``PluginError`` naming the broken plugins.
Failures in step 3, in observer hooks, or inside a plugin's pass, backend or op lowering
(see :func:`~tokopt.plugins.guard.plugin_guard`) raise ``PluginError`` naming the plugin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from tokopt.errors import PluginError
from tokopt.plugins import hookspecs
from tokopt.plugins.guard import BUILTIN, import_reference, plugin_guard
from tokopt.plugins.hookspecs import PLUGIN_API_VERSION, PROJECT_NAME, SUPPORTED_PLUGIN_API_VERSIONS
from tokopt.plugins.ops import OpDefinition, install_op

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "tokopt"
DISABLE_ENV = "TOKOPT_DISABLE_PLUGINS"

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
    """One loaded plugin: its distribution name and the pluggy manager holding it alone."""

    name: str
    pm: pluggy.PluginManager
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


def _pluggy_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    return pm


def _disabled() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip().lower() for part in raw.split(",") if part.strip()}


def _dist_name(ep: EntryPoint) -> str:
    dist = ep.dist
    return (dist.name if dist is not None and dist.name else ep.name) or ep.value


class PluginManager:
    """Which plugins are loaded (each in its own pluggy manager), which were set aside, what they provide."""

    def __init__(self, group: str = ENTRY_POINT_GROUP, discover: bool = True) -> None:
        self.group = group
        self._discover = discover
        self._discovered = False
        self.plugins: dict[str, PluginInfo] = {}  # by distribution name, in registration order
        self._failures: dict[str, str] = {}
        self._provided: dict[str, dict[str, Provided]] | None = None
        self._ops_installed: set[str] = set()

    # -- loading ----------------------------------------------------------------------------
    def discover(self) -> None:
        """Load every entry point of the group once, through pluggy (manifests are cheap by contract)."""
        if self._discovered:
            return
        self._discovered = True
        if not self._discover:
            return
        disabled = _disabled()
        found = list(entry_points(group=self.group))  # in sys.path order, one copy per distribution
        first: dict[str, EntryPoint] = {}  # pluggy loads the first entry point of each name
        for ep in found:
            first.setdefault(ep.name, ep)
        for ep in sorted(found, key=lambda e: (_dist_name(e), e.name)):
            dist = _dist_name(ep)
            if disabled & {"all", dist.lower(), ep.name.lower()}:
                log.info("plugin %s disabled by %s", dist, DISABLE_ENV)
            elif first[ep.name] is not ep:
                self._fail(dist, f"its entry point {ep.name!r} has the name of {_dist_name(first[ep.name])!r}'s "
                                 "entry point, so pluggy cannot load both; rename one")
            else:
                taken = dist in self.plugins or dist in self._failures
                self._load(ep, f"{dist}:{ep.name}" if taken else dist)  # a distribution's second entry point

    def _load(self, ep: EntryPoint, name: str) -> None:
        label = f"{ep.name} = {ep.value}"
        pm = _pluggy_manager()
        try:
            pm.load_setuptools_entrypoints(self.group, name=ep.name)
        except pluggy.PluginValidationError as exc:
            self._fail(name, f"plugin {name!r} does not fit the tokopt hook API ({label}): {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not take tokopt down
            self._fail(name, f"cannot import its entry point ({label}): {type(exc).__name__}: {exc}")
            return
        try:
            self._admit(PluginInfo(name, pm, label, ep.dist.version if ep.dist else None))
        except PluginError as exc:
            self._fail(name, str(exc))

    def register(self, plugin: Any, name: str) -> None:
        """Register a plugin object (a module, or any object with ``@hookimpl`` functions) in-process.

        Entry points are discovered first, so in-process plugins come after them.  Raises
        ``PluginError`` naming ``name`` if the object does not fit the hook API.
        """
        self.discover()
        if name in self.plugins or name == BUILTIN:
            raise PluginError(f"a plugin named {name!r} is already registered")
        pm = _pluggy_manager()
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name!r} does not fit the tokopt hook API: {exc}") from exc
        self._admit(PluginInfo(name, pm))

    def _admit(self, info: PluginInfo) -> None:
        """Accept a plugin pluggy just registered if it names only known hooks and speaks our API version."""
        try:
            info.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {info.name!r} does not fit the tokopt hook API: {exc}") from exc
        self.plugins[info.name] = info
        try:
            info.api_versions = self._api_versions(info.name)
        except PluginError:
            del self.plugins[info.name]
            raise
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

    def unregister(self, name: str) -> None:
        """Forget plugin ``name``, loaded or set aside."""
        self.plugins.pop(name, None)
        self._failures.pop(name, None)
        self._provided = None

    def _fail(self, name: str, message: str) -> None:
        """Set plugin ``name`` aside: no longer called, listed with why in :meth:`failures`."""
        log.warning("plugin %r is disabled: %s", name, message)
        self._failures[name] = message
        self.plugins.pop(name, None)
        self._provided = None

    # -- calling hooks ------------------------------------------------------------------------
    def call(self, hook: str, plugin: str | None = None, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call ``hook`` through pluggy, one plugin at a time: ``[(plugin, result), …]`` (non-None results).

        Plugins are called in registration order, each through its own pluggy manager, so
        a crash becomes a ``PluginError`` naming the plugin and the hook; a
        ``TokoptError`` raised on purpose passes through.
        """
        self.discover()
        results: list[tuple[str, Any]] = []
        for name in list(self.plugins) if plugin is None else [plugin]:
            with plugin_guard(name, f"hook {hook}"):
                answers = getattr(self.plugins[name].pm.hook, hook)(**kwargs)
            results += [(name, answer) for answer in answers]
        return results

    # -- what plugins provide -------------------------------------------------------------------
    def provided(self, kind: str) -> dict[str, Provided]:
        """Names of ``kind`` ("pass", "backend", "frontend") provided by plugins, not imported."""
        if self._provided is None:
            self._provided = self._collect()
        return self._provided[kind]

    def forget_provided(self) -> None:
        """Collect the plugins' names again on next use (the reserved built-in names changed)."""
        self._provided = None

    def _collect(self) -> dict[str, dict[str, Provided]]:
        self.discover()
        out: dict[str, dict[str, Provided]] = {kind: {} for kind in KINDS}
        for plugin in list(self.plugins):
            try:
                mine = [self._checked(entry, out) for kind in KINDS for entry in self._answers(plugin, kind)]
            except PluginError as exc:
                self._fail(plugin, str(exc))
                continue
            for entry in mine:
                out[entry.kind][entry.name] = entry
        return out

    def _answers(self, plugin: str, kind: str) -> list[Provided]:
        hook = KINDS[kind]
        entries = []
        for _, answer in self.call(hook, plugin=plugin):
            if not isinstance(answer, dict):
                raise PluginError(f"plugin {plugin!r}: {hook} returned {type(answer).__name__}, "
                                  "expected a dict of name -> 'module:Attribute'")
            entries += [Provided(kind, name, ref, plugin) for name, ref in answer.items()]
        return entries

    @staticmethod
    def _checked(entry: Provided, taken: dict[str, dict[str, Provided]]) -> Provided:
        """``entry`` if its name is a string nobody else has: not built in, not another plugin's."""
        plugin, kind, name = entry.plugin, entry.kind, entry.name
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r}: {KINDS[kind]} returned a non-string name {name!r}")
        if name in BUILTIN_NAMES[kind]:
            raise PluginError(f"plugin {plugin!r} provides {kind} {name!r}, which is built into tokopt; "
                              "plugins may add names, not replace built-ins")
        other = taken[kind].get(name)
        if other is not None:
            raise PluginError(f"plugin {plugin!r} provides {kind} {name!r}, which plugin {other.plugin!r} "
                              "already provides")
        return entry

    def failures(self) -> dict[str, str]:
        """Plugins that were set aside: distribution name -> why."""
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

    def install_ops(self, plugin: str | None = None) -> None:
        """Install the ops of ``plugin`` (or of every plugin) into the IR, the kernels and the lowerings."""
        self.discover()
        for name in [plugin] if plugin is not None else list(self.plugins):
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
