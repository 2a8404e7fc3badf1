"""Regional `torch.compile` of `IJepaForPreTraining`: each transformer layer is compiled, not each encoder.

Why regional (PyTorch tutorial "Reducing torch.compile cold start compilation time with regional compilation"):
identical layers share one graph (parameters are graph inputs, so the 32 layers of a ViT-H/14 encoder compile once),
compilation takes seconds instead of minutes on every rank, and under DDP a one-layer graph is smaller than a
gradient bucket, so DDP's graph splitting has nothing to split.

Shapes: the target encoder always sees all patches of a fixed batch, so its layers are compiled static. The context
encoder and the predictor see a different number of tokens every batch (in 200 ViT-H/14 batches, 47 distinct context
lengths), so their layers are compiled with that one dimension (dim 1, tokens) marked dynamic before each call;
batch and width stay static. Automatic dynamic shapes would instead compare the inputs of every layer that shares the
graph's code (the target encoder's, the predictor's other width and batch) and make those dimensions dynamic too.
Expected graphs: one per role (target / context / predictor), a few more for grad-mode and the first call's sizes.

The predictor's last layer runs through `layer_outputs_for_trailing_tokens` (queries only for target tokens), not
through the layer's `forward`, so it stays eager: one layer of the predictor.

Only torch is imported here, so the benchmark and the GPU check can use it without the training extra.
"""

from __future__ import annotations

import functools

import torch


def _compile_layer(layer: torch.nn.Module, dynamic_tokens: bool, backend, mode: str | None) -> None:
    """Replace `layer.forward` on the instance by a compiled one; parameter names and `state_dict` stay as they are
    (unlike `torch.compile(layer)`, which would add `_orig_mod.` to every name)."""
    compiled = torch.compile(layer.forward, dynamic=False, backend=backend, mode=mode)
    if not dynamic_tokens:
        layer.forward = compiled
        return

    @functools.wraps(layer.forward)
    def forward(hidden_states, *args, **kwargs):  # hidden_states: (batch, tokens, width)
        torch._dynamo.maybe_mark_dynamic(hidden_states, 1)
        return compiled(hidden_states, *args, **kwargs)

    layer.forward = forward


def compile_regions(model, backend="inductor", mode: str | None = None):
    """Compile every transformer layer of an `IJepaForPreTraining` in place (see the module docstring for the shape
    policy). Returns the model. `backend`/`mode` go to `torch.compile` (tests use `backend="aot_eager"`).

    Call it before `accelerator.prepare` / DDP wrapping, after activation checkpointing is enabled.
    """
    for layer in model.ijepa.layers:  # target encoder: (B, N, D), N = all patches
        _compile_layer(layer, dynamic_tokens=False, backend=backend, mode=mode)
    for layer in model.context_encoder.layers:  # (C*B, Kc, D)
        _compile_layer(layer, dynamic_tokens=True, backend=backend, mode=mode)
    for layer in model.predictor.layers[:-1]:  # (T*C*B, Kc+Kt, P); the last layer is trimmed, see above
        _compile_layer(layer, dynamic_tokens=True, backend=backend, mode=mode)
    return model


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far (`torch._dynamo.utils.counters["stats"]["unique_graphs"]`)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])
