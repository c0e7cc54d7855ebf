"""A backbone's layers grouped into blocks, and unfreezing the top N of them.

Blocks are what stage 2 unfreezes: "the top N blocks" always means whole
blocks (a whole residual, inverted-residual, inception, dense or NASNet unit
with its add/concat), never a raw layer count.

Block rules are an ordered tuple of `(regex, template)`: the first regex that
`re.fullmatch`es a layer name names the layer's block,
`template.format(*match.groups())`. Only layers that Keras names explicitly
should be matched; auto-named layers ("conv2d_12", "add_3", "activation_7")
get numeric suffixes that depend on what else was built in the process, so
they are placed by graph structure instead, in one of two ways
(`Family.grouping`):

* "cuts" (every family but NASNet): the layer graph is split at its cut
  points, layers that every input-to-output path passes through (the output
  of a residual unit, an inception concat, a plain conv of a stem). No skip
  connection crosses a cut, so a segment between two cuts can never hold half
  a residual unit. A segment is named by the last layer in it that matches a
  rule (the unit's closing add/concat decides); a segment with no matching
  layer joins the block before it, or forms "stem" when it comes first. The
  input layer joins the first block.
* "names" (NASNet): each cell reads the outputs of the two cells before it, so
  there are no cut points between cells. Layers matching a rule go to that
  block; every other layer (the generic relus, paddings and concats inside a
  cell) goes to the block of the layer that consumes it, or of its producer
  when nothing consumes it (the final relu).

Blocks are ordered by where their first layer appears in `model.layers`.
"""
from __future__ import annotations

import heapq
import math
import re
from typing import Optional

import keras

from tl_keras.errors import fail
from tl_keras.model.families import Family


def layer_graph(model: keras.Model) -> tuple[list, list[list[int]]]:
    """Returns the model's operations in topological order and their parents.

    Operations, not just layers: Keras 3 records `a + b` on tensors (ConvNeXt's
    residual add) as a bare Operation that `model.layers` leaves out, and a
    cut point is only a cut if no such skip edge jumps over it.

    Returns:
        (ops, parents): `parents[i]` are the indices in `ops` of the
        operations feeding `ops[i]`.
    """
    ops = list(model.operations)
    index = {id(op): i for i, op in enumerate(ops)}
    parents: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        # Keras 3 exposes no public parent links between a Functional model's
        # operations; `_inbound_nodes` is the graph Keras itself walks.
        for node in op._inbound_nodes:
            for parent in node.parent_nodes:
                j = index.get(id(parent.operation))
                # Layers reused in another graph have nodes there too.
                if j is not None and j not in parents[i]:
                    parents[i].append(j)
    # Kahn's algorithm, stable in model order: `model.operations` is already
    # topological in practice, but the cut test below relies on it.
    children: list[list[int]] = [[] for _ in ops]
    for i, ps in enumerate(parents):
        for j in ps:
            children[j].append(i)
    missing = [len(ps) for ps in parents]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, c)
    pos = {old: new for new, old in enumerate(order)}
    return ([ops[i] for i in order],
            [sorted(pos[j] for j in parents[i]) for i in order])


def _rule_block(rules, name: str) -> Optional[str]:
    """The block the first matching rule names for a layer name, or None."""
    for rx, tpl in rules:
        m = rx.fullmatch(name)
        if m:
            return tpl.format(*m.groups())
    return None


def _blocks_by_cuts(ops, parents, rules, family_name: str) -> list[tuple[str, list]]:
    """Groups ops into blocks of whole segments between graph cut points."""
    # An op is a cut point iff no edge jumps over its position in a
    # topological order: such an edge would be a path that avoids it.
    jumped = [0] * (len(ops) + 1)
    for i, ps in enumerate(parents):
        for j in ps:
            if i - j > 1:
                jumped[j + 1] += 1
                jumped[i] -= 1
    segments, seg, depth = [], [], 0
    for i, op in enumerate(ops):
        depth += jumped[i]
        seg.append(op)
        if depth == 0:
            segments.append(seg)
            seg = []
    if seg:
        segments.append(seg)

    blocks: list[tuple[str, list]] = []
    pending: list = []  # leading input layers, joining the first block
    for seg in segments:
        named = [b for b in (_rule_block(rules, op.name) for op in seg
                             if isinstance(op, keras.layers.Layer)) if b]
        # The last named layer is the unit's closing add/concat/activation.
        block = named[-1] if named else (blocks[-1][0] if blocks else None)
        if block is None:
            if all(isinstance(op, keras.layers.InputLayer) for op in seg):
                pending.extend(seg)
                continue
            block = "stem"
        if blocks and blocks[-1][0] == block:
            blocks[-1][1].extend(pending + seg)
        elif any(b == block for b, _ in blocks):
            # The rules would split a block around another one: a bug in the
            # family's rules (or a Keras change), never silently "fixed".
            raise RuntimeError(f"{family_name}: block {block!r} is not contiguous "
                               f"(again at layer {seg[-1].name!r})")
        else:
            blocks.append((block, pending + seg))
        pending = []
    if pending:
        blocks.append(("stem", pending))
    return blocks


def _blocks_by_names(ops, parents, rules) -> list[tuple[str, list]]:
    """Groups ops by rule; unmatched ops follow their consumer (or producer)."""
    block: list[Optional[str]] = [
        _rule_block(rules, op.name) if isinstance(op, keras.layers.Layer) else None
        for op in ops]
    children: list[list[int]] = [[] for _ in ops]
    for i, ps in enumerate(parents):
        for j in ps:
            children[j].append(i)
    for i in reversed(range(len(ops))):  # consumers first
        if block[i] is None:
            block[i] = next((block[c] for c in children[i] if block[c]), None)
    for i in range(len(ops)):  # ops nothing consumes (the output)
        if block[i] is None:
            block[i] = next((block[p] for p in parents[i] if block[p]), "stem")
    members: dict[str, list] = {}
    for op, b in zip(ops, block):
        members.setdefault(b, []).append(op)
    return list(members.items())


def block_map(model: keras.Model, family: Family) -> list[tuple[str, list[str]]]:
    """Groups the backbone's layers into ordered blocks of whole units.

    Args:
        model: a backbone built by `build_backbone` for `family`.
        family: its family; `block_rules` and `grouping` drive the grouping
            (see the module docstring).

    Returns:
        A list of (block name, [layer names]) in model order; every layer of
        `model.layers` is in exactly one block.

    Raises:
        RuntimeError: if the family's rules do not fit the model's graph.
    """
    rules = [(re.compile(rx), tpl) for rx, tpl in family.block_rules]
    ops, parents = layer_graph(model)
    if family.grouping == "names":
        blocks = _blocks_by_names(ops, parents, rules)
    else:
        blocks = _blocks_by_cuts(ops, parents, rules, family.name)
    # Bare Operations (ConvNeXt's adds) have no weights and no place in
    # `model.layers`, so they are left out of the result.
    out = [(b, [op.name for op in members if isinstance(op, keras.layers.Layer)])
           for b, members in blocks]
    return [(b, names) for b, names in out if names]


def num_blocks(model: keras.Model, family: Family) -> int:
    """Number of blocks of a built backbone."""
    return len(block_map(model, family))


# Share of a backbone's blocks that stage 2 unfreezes by default. Measured with
# MobileNetV2-0.35 at 160 px, 4 views, 6 epochs, on 7 splits (the shared
# flowers with seeds 1/2/3/42 and 3 disjoint subsets of flowers128; table in
# benchmarks/README.md): 4 blocks 0.774 mean test accuracy, 8 blocks 0.781,
# within noise (one split's standard error is 0.02-0.03), at about half of
# stage 2's time (5.6-6.2 s instead of 9.3-12 s on 2 CPU cores). Earlier, one
# seed: 4 blocks 0.816, 8 blocks 0.832, 12 blocks 0.836.
AUTO_FINETUNE_FRACTION = 0.2


def auto_finetune_blocks(n_blocks: int) -> int:
    """Blocks stage 2 unfreezes when --finetune_blocks=0 (auto).

    A fraction, not a count, so the default means the same depth for a
    12-block Inception as for a 62-block DenseNet.
    """
    return max(1, math.ceil(AUTO_FINETUNE_FRACTION * n_blocks))


def set_trainable_top_blocks(model: keras.Model, family: Family, n: int) -> list[str]:
    """Freezes the backbone except its top `n` blocks.

    BatchNormalization layers stay frozen everywhere: with trainable=False,
    Keras 3 runs them in inference mode, so their moving statistics never
    change on small data.

    Returns:
        The names of the unfrozen blocks, bottom to top.
    """
    blocks = block_map(model, family)
    if n > len(blocks):
        raise fail("finetune_blocks", n, f"{family.name} has only {len(blocks)} blocks")
    top = blocks[len(blocks) - n:] if n else []
    unfrozen = {name for _, names in top for name in names}
    model.trainable = True
    for layer in model.layers:
        layer.trainable = (layer.name in unfrozen
                           and not isinstance(layer, keras.layers.BatchNormalization))
    return [b for b, _ in top]
