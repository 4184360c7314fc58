"""The pipeline as written: the ``--passes`` syntax and YAML/TOML recipes, parsed into :class:`PassSpec`.

A pipeline is written either on the command line::

    --passes "quantize:bits=8,group_size=64,gqa:num_kv_heads=1"

(a token containing ``:`` — or a bare known pass name — starts a new pass; ``key=val``
tokens set options of the current pass; list values use ``;``), or as a YAML/TOML recipe
with the same meaning::

    passes:
      - quantize: {bits: 8, group_size: 64}
      - name: gqa
        options: {num_kv_heads: 1}

Parsing knows no pass: the caller says which names exist (``known``), and resolution of
names to pass classes happens in :mod:`tokopt.passes.pipeline`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokopt.errors import RecipeError

if TYPE_CHECKING:
    from tokopt.optimizer.pass_api import Pass

RECIPE_VERSION = 1
RECIPE_KEYS = ("version", "model", "backend", "passes", "eval", "speed", "gates")
#: What a resolved recipe (the recipe.yaml tokopt writes) says of each pass for people: read back, not needed.
RESOLVED_ONLY = ("plugin", "spec")


@dataclass
class PassSpec:
    """One pipeline entry as written: a pass name and its raw (unparsed) options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


def parse_passes(text: str | None, known: Collection[str], where: str = "--passes") -> list[PassSpec]:
    """Parse the ``--passes`` syntax into specs; ``known`` tells bare pass names from typos (names are
    checked again when resolving); ``where`` names the text's origin in errors (a recipe's entry)."""
    specs: list[PassSpec] = []
    for raw in (text or "").split(","):
        token = raw.strip()
        if not token:
            continue
        colon, equals = token.find(":"), token.find("=")
        if colon >= 0 and (equals < 0 or colon < equals):  # "name:" or "name:key=val"
            name, rest = token[:colon].strip(), token[colon + 1:].strip()
            if not name:
                raise RecipeError(f"{where}: {token!r} has no pass name before ':'")
            specs.append(PassSpec(name))
            if rest:
                _set_option(specs[-1], rest, token, where)
        elif equals >= 0:  # "key=val" for the current pass
            if not specs:
                raise RecipeError(f"{where}: option {token!r} comes before any pass name; "
                                  "write it as name:key=val")
            _set_option(specs[-1], token, token, where)
        elif token in known:  # a bare pass name
            specs.append(PassSpec(token))
        else:
            last = f"; if it is an option of {specs[-1].name}, write key=value" if specs else ""
            raise RecipeError(f"{where}: {token!r} is neither a known pass nor key=value{last}. "
                              f"Known passes: {', '.join(sorted(known)) or 'none'}")
    return specs


def _set_option(spec: PassSpec, text: str, token: str, where: str) -> None:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"{where}: {token!r}: expected key=value after the pass name")
    if key in spec.options:
        raise RecipeError(f"{where}: {spec.name}: option {key} is given twice")
    spec.options[key] = value.strip()


def load_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) recipe into a plain dictionary."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {p}: {exc}") from None
    try:
        if p.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - yaml and toml raise their own error types
        raise RecipeError(f"recipe {p} is not valid {'TOML' if p.suffix.lower() == '.toml' else 'YAML'}: {exc}",
                          ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {p}: the top level must be a mapping with a 'passes' list")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise RecipeError(f"recipe {p}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(RECIPE_KEYS)}")
    if data.get("version", RECIPE_VERSION) != RECIPE_VERSION:
        raise RecipeError(f"recipe {p}: version {data['version']} is not supported (this tokopt reads version "
                          f"{RECIPE_VERSION})")
    return data


def recipe_passes(entries: Any, known: Collection[str], where: str = "recipe") -> list[PassSpec]:
    """The ``passes`` list of a recipe: each entry ``{name:, options:}``, ``{name: {opts}}`` or ``"name:k=v"``."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise RecipeError(f"{where}: 'passes' must be a list")
    specs: list[PassSpec] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            specs.extend(parse_passes(entry, known, f"{where}: passes[{i}]"))
        elif isinstance(entry, dict) and "name" in entry:
            extra = sorted(set(entry) - {"name", "options", *RESOLVED_ONLY})
            if extra:
                raise RecipeError(f"{where}: passes[{i}] has unknown key(s) {', '.join(extra)}; "
                                  "write {name: ..., options: {...}}")
            options = entry.get("options") or {}
            if not isinstance(options, dict):
                raise RecipeError(f"{where}: passes[{i}].options must be a mapping")
            specs.append(PassSpec(str(entry["name"]), dict(options)))
        elif isinstance(entry, dict) and len(entry) == 1:
            (name, options), = entry.items()
            if options is not None and not isinstance(options, dict):
                raise RecipeError(f"{where}: passes[{i}]: options of {name} must be a mapping")
            specs.append(PassSpec(str(name), dict(options or {})))
        else:
            raise RecipeError(f"{where}: passes[{i}] must be 'name:key=val', {{name: {{options}}}} or "
                              "{name: ..., options: {...}}")
    return specs


def resolved_recipe(passes: list[Pass], **extra: Any) -> dict[str, Any]:
    """The recipe as it will run: every option explicit, with the plugin that provides each pass."""
    recipe: dict[str, Any] = {"version": RECIPE_VERSION}
    recipe.update({k: v for k, v in extra.items() if v is not None})
    recipe["passes"] = [{"name": p.name, "options": dict(p.opts), "plugin": p.plugin, "spec": p.spec()}
                        for p in passes]
    return recipe


__all__ = ["PassSpec", "RECIPE_VERSION", "RECIPE_KEYS", "parse_passes", "load_recipe", "recipe_passes",
           "resolved_recipe"]
