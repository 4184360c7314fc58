"""``prune-layers``: remove the decoder blocks that change the residual stream the least.

Deep decoders carry redundant blocks: the hidden state leaving them points almost the
same way as the one entering.  Measuring that on calibration text and dropping the most
redundant blocks removes their weights, their KV cache and their FLOPs at once, for a
small perplexity cost (Men et al. 2024, "ShortGPT"; Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers").

Redundancy is the angular distance ``arccos(cos(x_in, x_out)) / pi`` between a block's
input and output hidden states, averaged over every calibration token:

- ``strategy=contiguous`` (Gromov et al.): remove the run of ``num_layers`` consecutive
  blocks whose input and output are closest — one measurement of the whole run;
- ``strategy=independent`` (ShortGPT's block influence): remove the ``num_layers`` blocks
  with the smallest individual distance.

A block is removed by pointing every reader of its output at its input (the residual
edge that skips it) and dead-code-eliminating what nothing reads any more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tokopt.errors import PassOptionError, PreconditionError
from tokopt.optimizer.ir.graph import Graph, Value
from tokopt.optimizer.pass_api import Option, Pass, PassContext, PassResult

NORMS = ("RMSNorm", "LayerNorm")


@dataclass(frozen=True)
class Block:
    """One decoder block: where the residual stream enters it and where it leaves."""

    index: int
    entry: Value  # the residual stream before the block (input of its first norm)
    entry_norm: str  # that norm node (its first input is captured as the hidden state)


def _norm_input(graph: Graph, value: Value, what: str) -> tuple[Value, str]:
    """The residual-stream value feeding the norm that produces ``value``."""
    node = graph.producer(value)
    if node.op not in NORMS:
        raise PreconditionError(f"prune-layers needs pre-norm decoder blocks; {what} is fed by {node.name} "
                                f"({node.op}), not a norm")
    return graph.inputs_of(node.name)[0], node.name


def find_blocks(graph: Graph) -> tuple[list[Block], Value, str]:
    """The decoder blocks in order, plus the stream value after the last one and its final norm."""
    attention = sorted(graph.nodes("Attention"), key=lambda n: n.attrs.get("layer_index", 0))
    if not attention:
        raise PreconditionError("prune-layers needs a decoder with attention blocks; this graph has none")
    blocks = []
    for i, attn in enumerate(attention):
        q_proj = graph.producer(graph.inputs_of(attn.name)[0])
        if not graph.inputs_of(q_proj.name):
            raise PreconditionError(f"prune-layers cannot trace the input of {attn.name}")
        entry, norm = _norm_input(graph, graph.inputs_of(q_proj.name)[0], f"{attn.name}'s query projection")
        blocks.append(Block(i, entry, norm))
    head = graph.producer(graph.outputs["logits"])
    if head.op != "Linear":
        raise PreconditionError(f"prune-layers expects the logits to come from a Linear head, not {head.op}")
    final, final_norm = _norm_input(graph, graph.inputs_of(head.name)[0], "the LM head")
    return blocks, final, final_norm


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-token ``arccos(cos(a, b)) / pi`` over the last dimension, in [0, 1]."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


class PruneLayers(Pass):
    """Drop the ``num_layers`` decoder blocks whose output is closest to their input.

    Needs calibration text (unless ``layers`` names the blocks).  Changes numerics; moves
    parameters, weight bytes, KV bytes per token and FLOPs per token down by the removed
    blocks' share.  The note says which blocks went and how redundant they measured.
    """

    name = "prune-layers"
    summary = "Remove the N most redundant decoder blocks (angular distance on calibration text; ShortGPT)"
    options = (
        Option("num_layers", "int", 1, "how many decoder blocks to remove",
               check=lambda v: None if v >= 1 else "must be at least 1"),
        Option("strategy", "str", "contiguous",
               "contiguous: the closest run of num_layers consecutive blocks (Gromov et al.); "
               "independent: the num_layers individually closest blocks (ShortGPT)",
               choices=("contiguous", "independent")),
        Option("layers", "int_list", None, "remove exactly these block indices (e.g. 20;21); skips calibration"),
        Option("keep_last", "bool", True, "never remove the final block, which feeds the LM head"),
    )
    requires = frozenset({"calibration", "attention"})
    moves = ("params", "weight_bytes", "kv_bytes_per_token", "flops_per_token", "decode_tok_s_bound", "ppl")
    changes_numerics = True

    def validate(self) -> None:
        layers = self.opts["layers"]
        if layers is not None and len(set(layers)) != len(layers):
            raise PassOptionError(f"{self.name}: layers lists a block twice: {layers}")

    def check(self, graph: Graph, ctx: PassContext) -> None:
        blocks, _, _ = find_blocks(graph)
        n = len(self.opts["layers"]) if self.opts["layers"] is not None else self.opts["num_layers"]
        if n >= len(blocks):
            raise PreconditionError(f"{self.name}: cannot remove {n} of {len(blocks)} blocks; at least one must stay")
        for i in self.opts["layers"] or []:
            if not 0 <= i < len(blocks):
                raise PreconditionError(f"{self.name}: block {i} does not exist (blocks 0..{len(blocks) - 1})")
        if self.opts["layers"] is None and not ctx.calibration_batches:
            raise PreconditionError(f"{self.name} measures redundancy on calibration text; give --calib-text "
                                    "or name the blocks with layers=…")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        self.check(graph, ctx)
        blocks, final, final_norm = find_blocks(graph)
        if self.opts["layers"] is not None:
            chosen, why = sorted(self.opts["layers"]), "named by the layers option"
        else:
            states = self._hidden_states(graph, ctx, blocks, final_norm)
            chosen, why = self._choose(states, len(blocks))
        out = graph.copy()
        exits = [b.entry for b in blocks[1:]] + [final]
        for i in sorted(chosen, reverse=True):  # high to low: lower blocks' entry values stay valid
            out.replace_uses(exits[i], blocks[i].entry)
        removed_nodes = out.eliminate_dead_code()
        self._renumber(out, [i for i in range(len(blocks)) if i not in chosen])
        out.reinfer()
        note = f"removed blocks {', '.join(map(str, chosen))} of {len(blocks)} ({why}); {removed_nodes} nodes deleted"
        return PassResult(out, modified=True, notes=[note])

    def _hidden_states(self, graph: Graph, ctx: PassContext, blocks: list[Block], final_norm: str,
                       ) -> list[list[torch.Tensor]]:
        """The residual stream at every block boundary (len(blocks) + 1 entries), per batch."""
        names = [b.entry_norm for b in blocks] + [final_norm]
        captured = ctx.capture_inputs(graph, set(names))
        return [captured[n] for n in names]

    def _choose(self, states: list[list[torch.Tensor]], num_blocks: int) -> tuple[list[int], str]:
        n = self.opts["num_layers"]
        last = num_blocks - 1 if self.opts["keep_last"] else num_blocks

        def distance(i: int, j: int) -> float:  # mean angular distance between boundaries i and j
            d = torch.cat([angular_distance(a, b).flatten() for a, b in zip(states[i], states[j], strict=True)])
            return float(d.mean())

        if self.opts["strategy"] == "contiguous":
            starts = range(last - n + 1)
            if not starts:
                raise PreconditionError(f"{self.name}: no run of {n} blocks fits with keep_last=true")
            scores = {s: distance(s, s + n) for s in starts}
            best = min(scores, key=scores.get)
            return list(range(best, best + n)), f"contiguous run with angular distance {scores[best]:.4f}"
        scores = {i: distance(i, i + 1) for i in range(last)}
        chosen = sorted(sorted(scores, key=scores.get)[:n])
        shown = ", ".join(f"{i}:{scores[i]:.4f}" for i in chosen)
        return chosen, f"smallest angular distances {shown}"

    @staticmethod
    def _renumber(graph: Graph, kept: list[int]) -> None:
        """Keep layer indices contiguous and the metadata truthful about the depth."""
        for i, node in enumerate(sorted(graph.nodes("Attention"), key=lambda n: n.attrs.get("layer_index", 0))):
            node.attrs["layer_index"] = i
        graph.meta.num_layers = len(kept)
        config = graph.meta.hf_config
        for key in ("num_hidden_layers", "n_layer"):
            if key in config:
                config[key] = len(kept)
        if isinstance(config.get("layer_types"), list) and len(config["layer_types"]) > max(kept):
            config["layer_types"] = [config["layer_types"][i] for i in kept]
