"""The ``reference`` backend: the pure-PyTorch time loop of :mod:`rnnfast.reference` (any device, any floating
dtype). It is the spec, used by name; ``auto`` never picks it."""

from __future__ import annotations

from .. import reference
from . import Backend, LayerGrads, LayerOutputs, register


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable(self, spec):
        return None

    def auto_unavailable(self, spec):
        return "it is the specification, a Python loop over the steps: named explicitly only"

    def forward(self, inputs):
        y, h_n, c_n = reference.layer_forward(inputs.cell, *inputs.reference_args())
        return LayerOutputs(y, h_n, c_n, self.workspace(inputs))

    def workspace(self, inputs):
        # The reference backward recomputes the forward; it keeps nothing.
        return inputs.x.new_empty(0)

    def backward(self, inputs, outputs, grads):
        return LayerGrads(*reference.layer_backward(inputs.cell, grads.y, grads.h_n, grads.c_n,
                                                    *inputs.reference_args()))


register(ReferenceBackend())
