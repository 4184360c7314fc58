"""The tokopt plugin API — the plugin author's manual.

A plugin is an ordinary Python distribution that names a module in the ``tokopt``
entry-point group of its ``pyproject.toml``::

    [project.entry-points.tokopt]
    my_plugin = "my_package.tokopt_plugin"

That module (the *manifest*) implements some of the hooks below as plain functions
decorated with :data:`tokopt.plugins.hookimpl`.  tokopt imports every manifest the first
time it needs to know what plugins provide (``tokopt passes``, resolving a pass or backend
name, running a pipeline), so **a manifest must be cheap to import**: no torch, no model
code, only ``tokopt.plugins``.  Registration hooks therefore answer with *references* —
``"package.module:Attribute"`` strings — that tokopt imports only when that one thing is
used.  Returning the object itself also works; it just makes the import eager::

    from tokopt.plugins import hookimpl

    @hookimpl
    def tokopt_plugin_api_version() -> int:
        return 1

    @hookimpl
    def tokopt_register_passes() -> dict[str, str]:
        return {"prune-layers": "my_package.prune:PruneLayers"}

What a plugin contributes, and the contract each piece is held to:

**Passes** subclass :class:`tokopt.optimizer.pass_api.Pass`.  Class attributes declare
``name`` (the key you register it under), ``summary``, typed ``options``
(:class:`~tokopt.optimizer.pass_api.Option`; validated when the pass is constructed), the
conditions it ``requires`` of its input and ``ensures`` of its output, the report metrics
it ``moves`` and whether it ``changes_numerics``.  ``check(graph, ctx)`` raises
``PreconditionError`` for models it cannot handle; ``run(graph, ctx)`` returns a
:class:`~tokopt.optimizer.pass_api.PassResult` ``(graph, modified, notes)`` and must not
change its input (``graph.copy()`` is cheap).  The pass manager trusts none of this: it
verifies the returned graph and checks every declaration (``tokopt.optimizer.manager``),
raising ``PassContractError`` naming your plugin when one is false.

**Backends** subclass :class:`tokopt.backends.base.Backend` and are constructed with no
arguments.  ``availability()`` says whether the runtime is usable here (cheap, never
raises), ``capabilities()`` what it can express, ``check(graph)`` raises
``BackendRefusalError`` for anything it cannot express — before any work, never silently
dropping an attribute — ``lower(graph, out_dir)`` writes a self-contained artifact
directory and returns an :class:`~tokopt.backends.base.Artifact`, and ``load(path)``
returns a :class:`~tokopt.backends.base.Session` (``new_cache``/``forward``/``generate``,
the reference executor's interface, so parity checks and benchmarks treat every backend
alike).

**Ops** are :class:`tokopt.plugins.ops.OpDefinition` objects (see
:func:`tokopt_register_ops`): an :class:`~tokopt.optimizer.ir.ops.OpSpec` (inputs,
outputs, attributes with defaults, parameters, shape inference, FLOPs per token), a torch
kernel ``(node, inputs, step_context) -> tensor`` that *is* the op's numerical definition
(the reference executor runs it, and every backend is checked against it), and per-backend
``lowerings``.  The **onnxruntime** lowering (also used by the tensorrt backend, which
builds its engine from the same ONNX) is a callable::

    def lower(ctx: LowerContext, node: Node, inputs: list[str]) -> str | list[str]: ...

``inputs`` are the ONNX tensor names of the node's inputs, in order; ``node.attrs`` and
``node.params`` are the IR node's.  Emit ONNX nodes through ``ctx.b``
(:class:`~tokopt.backends.onnxruntime.onnx_builder.OnnxGraphBuilder`):
``ctx.b.op(op_type, inputs, name=…, **attributes)`` appends a default-domain node (opset
21) and returns its output name, ``ctx.b.ms(…)`` a ``com.microsoft`` contrib op,
``ctx.b.const(value, dtype)`` a small constant, and ``ctx.weight_init(node.params[role])``
the initializer of one of the node's parameters.  Return one tensor name per IR output (a
``str`` for a single output).  The artifact is refused unless its logits match the
reference executor's, so the lowering must compute what the torch kernel computes.  A
backend meeting an op without a lowering refuses the graph in ``check``, naming the op;
a lowering that crashes or returns anything else raises ``PluginError`` naming you.
``examples/tokopt-plugin-example`` (``softcap.py``) is a complete op with both.

Error handling: a manifest that fails to import, a hook that raises, an API version tokopt
does not speak, a reference that does not resolve, or a pass, backend or op lowering that
crashes with an exception that is not a :class:`~tokopt.errors.TokoptError` all become a
:class:`~tokopt.errors.PluginError` (CLI exit code 5) whose message names the
distribution.  Raise a ``TokoptError`` subclass (``PassOptionError``, ``PreconditionError``…)
yourself for problems the user can fix; those pass through unchanged.

Set ``TOKOPT_DISABLE_PLUGINS`` to a comma-separated list of distribution or entry-point
names (or ``all``) to skip plugins, e.g. to get a broken one out of the way.

tokopt loads each plugin with pluggy (``load_setuptools_entrypoints``) into a pluggy
manager of its own and calls its hooks through that manager's hook relay, so every
answer and every crash is attributed to one plugin; the answers of all plugins are then
merged (none of the hooks below is ``firstresult``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from tokopt.backends.base import Backend
    from tokopt.frontends.hf import Builder
    from tokopt.optimizer.ir.graph import Graph
    from tokopt.optimizer.pass_api import Pass
    from tokopt.plugins.ops import OpDefinition

PROJECT_NAME = "tokopt"

#: The version of this hook API.  It changes only when a hook's meaning or signature changes
#: incompatibly; new optional hooks do not change it.
PLUGIN_API_VERSION = 1

#: Versions of the API this tokopt still serves (a plugin must declare one of them).
SUPPORTED_PLUGIN_API_VERSIONS: frozenset[int] = frozenset({1})

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# -- compatibility --------------------------------------------------------------------------
@hookspec
def tokopt_plugin_api_version() -> int | list[int]:
    """Declare which plugin API version(s) this plugin was written for.

    Called once, right after the manifest is imported, before any other hook.

    :return: an ``int`` (e.g. ``1``) or a list of ints the plugin works with.  If none of
        them is in :data:`SUPPORTED_PLUGIN_API_VERSIONS`, tokopt refuses the plugin with a
        ``PluginError`` naming it (and the versions it speaks) instead of calling hooks
        whose meaning may have changed.  A plugin that does not implement this hook is
        assumed to target the current :data:`PLUGIN_API_VERSION` (a warning is logged).
    """


# -- registration -----------------------------------------------------------------------------
@hookspec
def tokopt_register_passes() -> dict[str, str | type[Pass]]:
    """Name the passes this plugin provides.

    Called once per process, the first time tokopt lists or resolves pass names.

    :return: ``{pass name: reference}`` where the reference is ``"module:Class"`` (imported
        only when the pass is used) or the :class:`~tokopt.optimizer.pass_api.Pass` subclass
        itself.  The class's ``name`` attribute must equal the key.  tokopt sets the
        class attribute ``plugin`` to your distribution name so reports and errors can
        name you.  A name that collides with a built-in pass or another plugin's pass is
        refused with a ``PluginError`` naming both providers.
    """


@hookspec
def tokopt_register_backends() -> dict[str, str | type[Backend]]:
    """Name the backends this plugin provides.

    Called once per process, the first time tokopt lists or resolves backend names.

    :return: ``{backend name: reference}``; the reference (``"module:Class"`` or the class)
        is a :class:`~tokopt.backends.base.Backend` subclass constructed with no
        arguments.  Its ``availability()`` must be cheap and must not raise when the
        backend's runtime is missing — say why instead.  Collisions are refused as for
        passes.
    """


@hookspec
def tokopt_register_frontends() -> dict[str, str | Builder]:
    """Teach tokopt to read more Hugging Face architectures.

    Called once per process, before tokopt resolves a checkpoint's ``model_type``.

    :return: ``{model_type: reference}``; the reference (``"module:function"`` or the
        function) is a builder ``(HFSource) -> Graph`` like the ones in
        ``tokopt/frontends/hf/`` (see ``llama_like.build_llama_like`` for the shared
        decoder).  It is imported only when a checkpoint of that ``model_type`` is loaded.
        A plugin may not replace a built-in architecture.  The checkpoint's ``config.json``
        is read with transformers' ``AutoConfig`` before your builder runs, so the
        ``model_type`` must be one transformers knows (the builder receives that config
        object as ``src.config`` and the raw dictionary as ``src.config_dict``).
    """


@hookspec
def tokopt_register_ops() -> list[str | OpDefinition]:
    """Declare new IR op kinds, their torch reference kernels and per-backend lowerings.

    Called once per process when a plugin's pass, backend or frontend is first resolved,
    or when a serialized graph mentions an op tokopt does not know — i.e. before any graph
    containing your op can exist.

    :return: a list of :class:`tokopt.plugins.ops.OpDefinition` objects or
        ``"module:attribute"`` references to them.  Each definition carries the
        :class:`~tokopt.optimizer.ir.ops.OpSpec` (schema, shape inference, cost model), the
        torch reference kernel (the op's numerical definition; installed in
        ``tokopt.optimizer.interpret.kernels.KERNELS``) and optional ``lowerings``:
        ``{backend name: object}`` whose meaning each backend documents (the onnxruntime
        one is the callable described at the top of this module; backends look them up
        with :func:`tokopt.plugins.op_lowering`).  A backend meeting an op with no
        lowering for it refuses the graph in ``check``, naming the op.
    """


# -- pipeline observers ---------------------------------------------------------------------
@hookspec
def tokopt_pipeline_start(model: str, passes: list[str], backend: str | None, graph: Graph) -> None:
    """A pipeline is about to run.

    Called after the model is loaded and the pipeline resolved, before the baseline is
    measured.  Observers must not modify ``graph``.

    :param model: the MODEL argument as the user gave it.
    :param passes: the resolved pass specs in order, e.g. ``["quantize:bits=8"]``.
    :param backend: the target backend name, or ``None`` when nothing is lowered.
    :param graph: the imported, verified graph.
    """


@hookspec
def tokopt_stage_start(stage: str, index: int, graph: Graph) -> None:
    """A stage is about to run.

    :param stage: ``"baseline"`` for the imported model (index 0), otherwise the
        canonical spec of the pass about to run (``"gqa:num_kv_heads=1"``).
    :param index: 0 for the baseline, then 1, 2, … in pipeline order.
    :param graph: the graph the stage starts from (do not modify it).
    """


@hookspec
def tokopt_stage_end(stage: str, index: int, graph: Graph, metrics: dict[str, Any], notes: list[str]) -> None:
    """A stage finished, was verified and measured.

    :param stage: as in :func:`tokopt_stage_start`.
    :param index: as in :func:`tokopt_stage_start`.
    :param graph: the graph the stage produced (do not modify it).
    :param metrics: that stage's row of ``report.json`` (``params``, ``weight_bytes``,
        ``kv_bytes_per_token``, ``ppl``, ``kl``, … — the keys documented there).
    :param notes: what the pass said it did (empty for the baseline).
    """


@hookspec
def tokopt_pipeline_end(report: dict[str, Any] | None, out_dir: Path | None, error: BaseException | None) -> None:
    """A pipeline ended, successfully or not.

    :param report: the full report dictionary (as written to ``report.json``), or ``None``
        when the pipeline failed before a report existed.
    :param out_dir: where the outputs were written, or ``None`` (dry run or failure: on
        failure nothing is left on disk).
    :param error: the exception that ended the pipeline, or ``None`` on success (a failed
        quality gate is a success of the pipeline; the gates are in ``report``).
    """
