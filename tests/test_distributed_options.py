"""Distribution options of the pretraining loop: DDP kwargs, FSDP refused with a message, resume on another world
size (the schedules continue from the same number of images, or the resume is refused)."""

import json
from types import SimpleNamespace

import pytest

from modeling_ijepa.training import loop
from modeling_ijepa.training.arguments import PretrainingArguments, resolve_schedules
from modeling_ijepa.training.schedules import step_for_global_batch

SAMPLES = 12_800


def schedules_at(global_batch, **overrides):
    args = PretrainingArguments(num_train_epochs=10, warmup_epochs=2, **overrides)
    return resolve_schedules(args, SAMPLES, global_batch)


def test_ddp_kwargs__bucket_views_and_no_unused_parameter_search():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, kwargs_handlers=[loop.ddp_kwargs()])
    handler = accelerator.ddp_handler
    assert handler.gradient_as_bucket_view and not handler.find_unused_parameters and not handler.static_graph
    assert handler.bucket_cap_mb == loop.DDP_BUCKET_CAP_MB


def test_fsdp__refused_with_what_to_do_instead():
    from accelerate.utils import DistributedType

    loop.refuse_unsupported_distribution(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU))
    with pytest.raises(RuntimeError, match="FSDP is not supported.*Launch with DDP"):
        loop.refuse_unsupported_distribution(SimpleNamespace(distributed_type=DistributedType.FSDP))


def test_step_for_global_batch__epoch_schedules_continue_from_the_same_images():
    old, new = schedules_at(64), schedules_at(128)  # e.g. 2 -> 4 processes of 32 images
    step = step_for_global_batch(301, saved_global_batch=64, saved_schedules=vars(old), schedules=new,
                                 global_batch=128)
    assert step == 150  # 301 * 64 // 128: 19,264 images seen, rounded down to whole new steps
    old_values, new_values = old.at(301), new.at(step)
    assert new_values["momentum"] == pytest.approx(old_values["momentum"], abs=1e-5)
    assert new_values["weight_decay"] == pytest.approx(old_values["weight_decay"], rel=1e-2)
    # Linear scaling: the peak lr doubles with the batch; the point on the cosine is the same.
    assert new_values["lr"] == pytest.approx(2 * old_values["lr"], rel=1e-2)
    assert step_for_global_batch(7, saved_global_batch=64, saved_schedules=None, schedules=new,
                                 global_batch=64) == 7


def test_step_for_global_batch__step_schedules_are_refused_with_the_flags_to_pass():
    old, new = schedules_at(64, max_steps=1000, warmup_steps=100), schedules_at(128, max_steps=1000, warmup_steps=100)
    with pytest.raises(ValueError, match="Pass --max_steps 500 --warmup_steps 50"):
        step_for_global_batch(300, saved_global_batch=64, saved_schedules=vars(old), schedules=new, global_batch=128)
    fixed = schedules_at(128, max_steps=500, warmup_steps=50)
    assert step_for_global_batch(300, saved_global_batch=64, saved_schedules=vars(old), schedules=fixed,
                                 global_batch=128) == 150


def fake_run(tmp_path, schedules, world_size, global_batch):
    calls = []
    accelerator = SimpleNamespace(load_state=calls.append, process_index=0)
    run = SimpleNamespace(accelerator=accelerator, world_size=world_size, global_batch_size=global_batch,
                          schedules=schedules, global_step=0, data_state=SimpleNamespace(epoch=0))
    return run, calls


def write_trainer_state(path, step, world_size, global_batch, schedules):
    path.mkdir()
    state = {"global_step": step, "world_size": world_size, "global_batch_size": global_batch,
             "schedules": vars(schedules)}
    (path / loop.TRAINER_STATE_NAME).write_text(json.dumps(state))


def test_restore__ignore_data_skip_on_another_world_size_continues_in_images(tmp_path):
    checkpoint = tmp_path / "checkpoint-301"
    write_trainer_state(checkpoint, 301, 2, 64, schedules_at(64))
    run, loaded = fake_run(tmp_path, schedules_at(128), world_size=4, global_batch=128)
    loop.restore(run, checkpoint, ignore_data_skip=True)
    assert run.global_step == 150 and loaded == [str(checkpoint)]


def test_restore__refused_before_reading_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoint-300"
    write_trainer_state(checkpoint, 300, 2, 64, schedules_at(64, max_steps=1000))
    run, loaded = fake_run(tmp_path, schedules_at(128, max_steps=1000), world_size=4, global_batch=128)
    with pytest.raises(ValueError, match="--max_steps 500"):
        loop.restore(run, checkpoint, ignore_data_skip=True)
    assert loaded == []  # the weights were never read
