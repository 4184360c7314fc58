"""A pipeline of passes by name: ``--passes``/recipes resolved to configured built-in and plugin passes.

This is where pass *names* meet pass *classes* (:mod:`tokopt.passes.registry`, which asks the
plugins); parsing lives in :mod:`tokopt.optimizer.recipe` and running in
:mod:`tokopt.optimizer.manager`, neither of which knows any pass.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from tokopt.optimizer import recipe
from tokopt.optimizer.ir.graph import Graph
from tokopt.optimizer.manager import StageObserver, StageResult, check_pipeline, guard_pass, run_pipeline
from tokopt.optimizer.pass_api import Pass, PassContext
from tokopt.optimizer.recipe import PassSpec
from tokopt.passes.registry import get_pass_class, known_pass_names
from tokopt.plugins import StageNotifier


def parse_passes(text: str | None, known: Collection[str] | None = None) -> list[PassSpec]:
    """The ``--passes`` syntax parsed against ``known`` names (default: the installed passes, built-in and plugin)."""
    return recipe.parse_passes(text, known_pass_names() if known is None else known)


def recipe_passes(entries: object, where: str = "recipe") -> list[PassSpec]:
    """A recipe's ``passes`` list parsed against the installed passes."""
    return recipe.recipe_passes(entries, known_pass_names(), where)


def resolve(specs: list[PassSpec]) -> list[Pass]:
    """Instantiate every pass (validating its options) before anything runs."""
    passes: list[Pass] = []
    for spec in specs:
        cls = get_pass_class(spec.name)
        plugin = getattr(cls, "plugin", "tokopt")
        passes.append(guard_pass(plugin, spec.name, "configuring", lambda cls=cls, spec=spec: cls(**spec.options)))
    return passes


class Pipeline:
    """A resolved, ordered list of configured passes — the Python face of ``--passes``.

    ``Pipeline.parse("quantize:bits=8").run(graph)`` runs it without measurement;
    :func:`tokopt.optimize` is the measured, reported, lowered version.
    """

    def __init__(self, passes: list[Pass]) -> None:
        self.passes = list(passes)

    @classmethod
    def parse(cls, text: str | None) -> Pipeline:
        return cls(resolve(parse_passes(text)))

    @classmethod
    def from_recipe(cls, path: str | Path) -> Pipeline:
        return cls(resolve(recipe_passes(recipe.load_recipe(path).get("passes"), str(path))))

    def specs(self) -> list[str]:
        return [p.spec() for p in self.passes]

    def check(self, graph: Graph, ctx: PassContext | None = None) -> None:
        check_pipeline(self.passes, graph, ctx or PassContext())

    def run(self, graph: Graph, ctx: PassContext | None = None, on_stage=None,
            observer: StageObserver | None = None) -> Graph:
        """Check, then run every pass (verified and contract-checked after each); returns the final graph.

        Plugin observers hear of every stage unless another ``observer`` is given.
        """
        ctx = ctx or PassContext(reference_graph=graph)
        self.check(graph, ctx)
        stages: list[StageResult] = run_pipeline(self.passes, graph, ctx, on_stage, observer or StageNotifier())
        return stages[-1].graph

    def __repr__(self) -> str:
        return f"Pipeline({', '.join(self.specs()) or 'empty'})"


__all__ = ["Pipeline", "parse_passes", "recipe_passes", "resolve"]
