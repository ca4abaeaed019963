"""Two-operand Einsums that are a batched matrix product, rewritten as Transpose + MatMul.

Attention written with `torch.einsum("bhqd,bhkd->bhqk", q, k)` exports as Einsum, which ONNX
Runtime runs in float between integer ops and no quantizer here places Q/DQ around: INT8 left it
a float island. As a MatMul it is the activation x activation product every target quantizes.
Only the equations that need no reshape are rewritten: besides batch labels (in both operands
and the output, in the same order), each operand has one label of its own kept in the output
(the row, the column) and one contracted label; anything else stays an Einsum."""

from __future__ import annotations

import onnx
from onnx import helper

from enginekit.onnx.nodes import attribute


def einsum_as_matmul(model: onnx.ModelProto) -> int:
    """Rewrite the matching Einsum nodes of the main graph in place; how many."""
    nodes: list[onnx.NodeProto] = []
    rewritten = 0
    for index, node in enumerate(model.graph.node):
        plan = _plan(node) if node.op_type == "Einsum" and node.domain in ("", "ai.onnx") and len(node.input) == 2 else None
        if plan is None:
            nodes.append(node)
            continue
        nodes.extend(_matmul_nodes(node, index, *plan))
        rewritten += 1
    if rewritten:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
    return rewritten


def _plan(node: onnx.NodeProto) -> tuple[list[int], list[int], list[int]] | None:
    """The permutations putting A as [batch..., row, contracted], B as [batch..., contracted,
    column], and the MatMul's [batch..., row, column] in the output's order; None if the
    equation is not such a product."""
    equation = attribute(node, "equation", b"")
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    operands, output = equation.split("->")
    parts = operands.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(labels)) != len(labels) for labels in (a, b, output)):
        return None
    batch = [label for label in a if label in b and label in output]
    contracted = [label for label in a if label in b and label not in output]
    rows = [label for label in a if label not in b]
    columns = [label for label in b if label not in a]
    if (len(contracted) != 1 or len(rows) != 1 or len(columns) != 1 or [label for label in b if label in batch] != batch
            or any(label not in output for label in rows + columns) or len(output) != len(batch) + 2):
        return None
    a_order = batch + rows + contracted
    b_order = batch + contracted + columns
    product = batch + rows + columns
    return [a.index(label) for label in a_order], [b.index(label) for label in b_order], [product.index(label) for label in output]


def _matmul_nodes(node: onnx.NodeProto, index: int, a_perm: list[int], b_perm: list[int], out_perm: list[int]) -> list[onnx.NodeProto]:
    prefix = f"{node.name or 'einsum'}_{index}"
    nodes: list[onnx.NodeProto] = []

    def arranged(name: str, perm: list[int], tag: str) -> str:
        if perm == sorted(perm):
            return name
        nodes.append(helper.make_node("Transpose", [name], [f"{prefix}_{tag}"], perm=perm, name=f"{prefix}_{tag}"))
        return f"{prefix}_{tag}"

    left, right = arranged(node.input[0], a_perm, "a"), arranged(node.input[1], b_perm, "b")
    if out_perm == sorted(out_perm):
        nodes.append(helper.make_node("MatMul", [left, right], list(node.output), name=f"{prefix}_matmul"))
    else:
        nodes.append(helper.make_node("MatMul", [left, right], [f"{prefix}_product"], name=f"{prefix}_matmul"))
        nodes.append(helper.make_node("Transpose", [f"{prefix}_product"], list(node.output), perm=out_perm, name=f"{prefix}_out"))
    return nodes
