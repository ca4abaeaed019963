"""ONNX LSTM, GRU and RNN lowered to TensorFlow ops, unrolled over the sequence.

Why unrolled: TFLite's fused UNIDIRECTIONAL_SEQUENCE_LSTM comes only from Keras layers the
converter recognises, and a tf.while_loop becomes a WHILE op that neither XNNPACK nor the int8
quantizer takes. Unrolled, each step is a FULLY_CONNECTED on the hidden state plus element-wise
gates, ops every TFLite kernel set runs; the input projection of all steps is one
FULLY_CONNECTED. The sequence length must therefore be known at lowering (fixed with
--input-shape where the model declares it symbolic); the batch may stay dynamic.

Semantics are ONNX's (gate order i, o, f, c for LSTM and z, r, h for GRU; biases W then R;
`layout`, `direction`, `clip`, peepholes, GRU's `linear_before_reset`); what is not lowered
(other activations, `input_forget`, per-sample sequence lengths) is refused naming the node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from enginekit.core.errors import InputError
from enginekit.targets.tflite.values import Value, require_constant, tf_module

SCOPE = "recurrence"  # the TF name scope of every op an LSTM or GRU lowers to: TFLite tensor names start with it
_ACTIVATIONS: dict[str, Callable[[Any], Any]] = {
    "sigmoid": lambda x: tf_module().sigmoid(x), "tanh": lambda x: tf_module().tanh(x), "relu": lambda x: tf_module().nn.relu(x)}


def _refuse(node: onnx.NodeProto, why: str, option: str | None = None) -> InputError:
    return InputError(f"node {node.name} ({node.op_type}): the tflite target {why}", option=option)


def _activations(node: onnx.NodeProto, attrs: dict[str, Any], defaults: tuple[str, ...], directions: int) -> list[tuple[Callable, ...]]:
    """Each direction's activation functions (f, g[, h]), ONNX's defaults where not given."""
    if attrs.get("activation_alpha") or attrs.get("activation_beta"):
        raise _refuse(node, "lowers only activations without alpha/beta parameters")
    names = [(n.decode() if isinstance(n, bytes) else n).lower() for n in attrs.get("activations", [])] or list(defaults) * directions
    unknown = sorted(set(names) - set(_ACTIVATIONS))
    if unknown or len(names) != len(defaults) * directions:
        raise _refuse(node, f"lowers the activations {', '.join(sorted(_ACTIVATIONS))} only (this node has {', '.join(names)})")
    per = len(defaults)
    return [tuple(_ACTIVATIONS[n] for n in names[d * per:(d + 1) * per]) for d in range(directions)]


def _with_known_length(value: Value, layout: int, features: int) -> Any:
    """The sequence tensor with its length restored where TensorFlow lost it but ONNX shape
    inference knows it (a PyTorch CRNN's squeeze and permute after a pooling: TF knew no dim)."""
    data = value.data
    axis = 1 if layout else 0
    known = value.onnx_dims[axis] if value.onnx_dims is not None and len(value.onnx_dims) == 3 else None
    if value.const or data.shape.rank != 3 or data.shape[axis] is not None or not isinstance(known, int):
        return data
    return tf_module().reshape(data, (-1, known, features) if layout else (known, -1, features))


def _in_scope(lower: Callable) -> Callable:
    """The lowering with every TF op it makes under SCOPE (the int8 build keeps them float)."""
    def scoped(node, args, attrs):
        with tf_module().name_scope(SCOPE):
            return lower(node, args, attrs)

    scoped.__doc__ = lower.__doc__
    return scoped


class _Recurrence:
    """What LSTM and GRU share: the sequence in [seq, batch, input] order, its static length,
    directions, the optional initial state, and the outputs in the node's layout."""

    def __init__(self, node: onnx.NodeProto, args: list[Value | None], attrs: dict[str, Any], gates: int):
        if attrs.get("input_forget", 0):
            raise _refuse(node, "does not lower input_forget=1")
        self.layout = attrs.get("layout", 0)
        direction = attrs.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        self.reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
        tf = tf_module()
        self.weights = require_constant(args[1], node, "the input weights").astype(np.float32)
        x = _with_known_length(args[0], self.layout, self.weights.shape[-1])
        self.x = tf.transpose(x, (1, 0, 2)) if self.layout else x  # [seq, batch, input]
        self.steps = self.x.shape[0]
        if self.steps is None:
            raise _refuse(node, "unrolls it over its sequence, whose length is a symbolic dim at lowering; fix that dim", option="input_shapes")
        self.recurrent = require_constant(args[2], node, "the recurrence weights").astype(np.float32)
        self.hidden = self.recurrent.shape[-1]
        given = args[3] if len(args) > 3 else None
        self.bias = (require_constant(given, node, "the bias").astype(np.float32) if given is not None
                     else np.zeros((len(self.reverse), 2 * gates * self.hidden), np.float32))
        lengths = args[4] if len(args) > 4 else None
        if lengths is not None and not (lengths.const and np.all(lengths.data == self.steps)):
            raise _refuse(node, "lowers only sequences that all run the full length (no per-sample sequence_lens)")
        self.initial = [self._state(args, index) for index in (5, 6)]
        clip = attrs.get("clip")
        self.clip = (lambda v: tf.clip_by_value(v, -np.float32(clip), np.float32(clip))) if clip else (lambda v: v)

    @classmethod
    def of(cls, node: onnx.NodeProto, args: list[Value | None], attrs: dict[str, Any], gates: int,
           activations: tuple[str, ...]) -> tuple["_Recurrence", list[tuple[Callable, ...]]]:
        """The recurrence and each direction's activation functions (`activations`: ONNX's defaults)."""
        run = cls(node, args, attrs, gates)
        return run, _activations(node, attrs, activations, len(run.reverse))

    def _state(self, args: list[Value | None], index: int) -> Any:
        """An initial state [directions, batch, hidden] (layout 1: [batch, directions, hidden]), or None."""
        value = args[index] if len(args) > index else None
        if value is None:
            return None
        data = value.data.astype(np.float32) if value.const else value.data
        return tf_module().transpose(data, (1, 0, 2)) if self.layout else data

    def projected(self, direction: int) -> list[Any]:
        """x W^T + Wb for every step at once (one FULLY_CONNECTED), then one tensor per step."""
        tf = tf_module()
        weights = self.weights[direction]
        flat = tf.reshape(self.x, (-1, weights.shape[1]))
        width = weights.shape[0]
        projected = tf.matmul(flat, weights.T) + self.bias[direction][:width]
        return tf.unstack(tf.reshape(projected, (self.steps, -1, width)), axis=0)

    def start(self, which: int, direction: int) -> Any:
        state = self.initial[which]
        return None if state is None else state[direction]

    def outputs(self, sequences: list[list[Any]], finals: list[list[Any]]) -> list[Value]:
        """Y [seq, directions, batch, hidden] and each final state [directions, batch, hidden]
        (layout 1: [batch, seq, directions, hidden] and [batch, directions, hidden])."""
        tf = tf_module()
        y = tf.stack([tf.stack(steps, axis=0) for steps in sequences], axis=1)
        states = [tf.stack(list(group), axis=0) for group in zip(*finals)]
        if self.layout:
            return [Value(tf.transpose(y, (2, 0, 1, 3)))] + [Value(tf.transpose(s, (1, 0, 2))) for s in states]
        return [Value(y)] + [Value(s) for s in states]

    def order(self, direction: int) -> range:
        return range(self.steps - 1, -1, -1) if self.reverse[direction] else range(self.steps)

    def unroll(self, step: Callable[[int, Any, tuple], tuple], states: int) -> list[Value]:
        """Every direction run step by step in its order: `step(direction, projected input,
        state)` returns the next state (hidden first; None in a state: zero). The node's outputs:
        Y and the final states."""
        sequences, finals = [], []
        for direction in range(len(self.reverse)):
            inputs = self.projected(direction)
            state = tuple(self.start(which, direction) for which in range(states))
            hidden: dict[int, Any] = {}
            for t in self.order(direction):
                state = step(direction, inputs[t], state)
                hidden[t] = state[0]
            sequences.append([hidden[t] for t in range(self.steps)])
            finals.append(state)
        return self.outputs(sequences, finals)


@_in_scope
def lstm(node, args, attrs):
    """ONNX LSTM: i, o, f, c gates; C = f*C' + i*g(c); H = o*h(C); peepholes P (i, o, f)."""
    tf = tf_module()
    run, activations = _Recurrence.of(node, args, attrs, 4, ("sigmoid", "tanh", "tanh"))
    peepholes = args[7] if len(args) > 7 else None
    peepholes = require_constant(peepholes, node, "the peepholes").astype(np.float32) if peepholes is not None else None

    def step(direction: int, x: Any, state: tuple) -> tuple:
        hidden, cell = state
        f, g, h = activations[direction]
        recurrent_bias = run.bias[direction][4 * run.hidden:]
        gates = x + recurrent_bias if hidden is None else x + tf.matmul(hidden, run.recurrent[direction].T) + recurrent_bias
        i, o, forget, c = tf.split(gates, 4, axis=1)
        p_i, p_o, p_f = (None, None, None) if peepholes is None else np.split(peepholes[direction], 3)
        if p_i is not None and cell is not None:
            i, forget = i + p_i * cell, forget + p_f * cell
        candidate = f(run.clip(i)) * g(run.clip(c))
        cell = candidate if cell is None else f(run.clip(forget)) * cell + candidate
        if p_o is not None:
            o = o + p_o * cell
        return f(run.clip(o)) * h(cell), cell

    return run.unroll(step, states=2)


@_in_scope
def gru(node, args, attrs):
    """ONNX GRU: z, r, h gates; H = (1 - z)*h~ + z*H'. With linear_before_reset (PyTorch's form)
    the reset gate scales (H' Rh^T + Rbh), else it scales H' before the product."""
    tf = tf_module()
    run, activations = _Recurrence.of(node, args, attrs, 3, ("sigmoid", "tanh"))
    before_reset = attrs.get("linear_before_reset", 0)
    size = run.hidden

    def step(direction: int, x: Any, state: tuple) -> tuple:
        (hidden,) = state
        f, g = activations[direction]
        recurrent, recurrent_bias = run.recurrent[direction], run.bias[direction][3 * size:]
        x_z, x_r, x_h = tf.split(x, 3, axis=1)
        if hidden is None:  # a zero state: its products are the recurrence biases alone
            h_z, h_r, h_h = np.split(recurrent_bias, 3)
        elif before_reset:
            h_z, h_r, h_h = tf.split(tf.matmul(hidden, recurrent.T) + recurrent_bias, 3, axis=1)
        else:
            h_z, h_r = tf.split(tf.matmul(hidden, recurrent[:2 * size].T) + recurrent_bias[:2 * size], 2, axis=1)
        z, r = f(run.clip(x_z + h_z)), f(run.clip(x_r + h_r))
        if before_reset:
            candidate = g(run.clip(x_h + r * h_h))
        elif hidden is None:  # (r * 0) Rh^T + Rbh
            candidate = g(run.clip(x_h + h_h))
        else:
            candidate = g(run.clip(x_h + tf.matmul(r * hidden, recurrent[2 * size:].T) + recurrent_bias[2 * size:]))
        return (candidate - z * candidate if hidden is None else candidate + z * (hidden - candidate),)

    return run.unroll(step, states=1)


@_in_scope
def rnn(node, args, attrs):
    """ONNX RNN (PyTorch's nn.RNN): H = f(x W^T + H' R^T + Wb + Rb), f tanh unless given."""
    tf = tf_module()
    run, activations = _Recurrence.of(node, args, attrs, 1, ("tanh",))

    def step(direction: int, x: Any, state: tuple) -> tuple:
        (hidden,) = state
        recurrent_bias = run.bias[direction][run.hidden:]
        product = recurrent_bias if hidden is None else tf.matmul(hidden, run.recurrent[direction].T) + recurrent_bias
        return (activations[direction][0](run.clip(x + product)),)

    return run.unroll(step, states=1)
