"""Regional torch.compile (`modeling_ijepa.compilation.compile_regions`): bounded recompilation with masks of
changing lengths, and the same losses as eager. Also: no attribute assignment in the predictor's forward."""

import copy
import time

import torch

from modeling_ijepa import IJepaForPreTraining, IJepaMaskCollator, ijepa_config_from_preset
from modeling_ijepa.compilation import compile_regions, compiled_graph_count

STEPS = 30
BATCH = 2
# One graph per role (target encoder static, context encoder and predictor with a dynamic token dimension) plus one
# for the forward under no_grad/eval at most; measured: 4 with both "eager" and "aot_eager" backends.
MAX_GRAPHS = 6


def tiny_config(**overrides):
    values = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        pred_hidden_size=16, pred_num_hidden_layers=2, pred_num_attention_heads=4,
    )
    values.update(overrides)
    return ijepa_config_from_preset("tiny-cpu", **values)


def test_compile_regions__bounded_recompiles_and_eager_losses():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a second thread only adds contention on a shared CI machine
    try:
        run_compiled_and_eager()
    finally:
        torch.set_num_threads(threads)


def run_compiled_and_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = tiny_config()
    eager = IJepaForPreTraining(config).train()
    eager.check_mask_values = False
    compiled = compile_regions(copy.deepcopy(eager), backend="aot_eager")  # forward and backward graphs, no codegen
    assert list(compiled.state_dict()) == list(eager.state_dict())  # parameter names unchanged
    collator = IJepaMaskCollator(config, seed=0)
    optimizers = [torch.optim.AdamW(m.trainable_parameters(), lr=1e-3) for m in (eager, compiled)]
    graphs, lengths, start = [], set(), time.perf_counter()
    for step in range(STEPS):
        pixel_values = torch.randn(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(step))
        context_mask, target_mask = collator.sample(BATCH)
        lengths.add((context_mask[0].size(1), target_mask[0].size(1)))
        losses = []
        for model, optimizer in zip((eager, compiled), optimizers):
            loss = model(pixel_values, context_mask=context_mask, target_mask=target_mask).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_target_encoder(0.99)
            losses.append(loss.item())
        torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5, msg=f"step {step}")
        graphs.append(compiled_graph_count())
    assert len(lengths) >= 5, lengths  # the masks really changed length
    assert graphs[-1] <= MAX_GRAPHS, graphs
    assert graphs[-1] == graphs[2], graphs  # nothing compiled after the first steps
    print(f"{STEPS} steps, {len(lengths)} distinct (context, target) lengths, graphs compiled {graphs[-1]}, "
          f"{time.perf_counter() - start:.1f} s")


def test_set_attn_implementation__reaches_the_predictor_layers():
    model = IJepaForPreTraining(tiny_config())
    for name in ("eager", "sdpa"):
        model.set_attn_implementation(name)
        assert model.predictor.layer_config._attn_implementation == name
        assert model.predictor.layers[0].attention.config._attn_implementation == name
