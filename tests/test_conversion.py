"""Official checkpoint conversion (scripts/convert_ijepa_checkpoint.py, modeling_ijepa/convert_official.py), the
plain-transformers encoder export, and loading our checkpoints where this package is not installed.

The official-format checkpoints are written here from random tensors under the official key names, listed by hand
from facebookresearch/ijepa `src/models/vision_transformer.py` (independently of the key map under test).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_ijepa import IJepaForPreTraining
from modeling_ijepa import convert_official as conv
from modeling_ijepa.conversion import ConversionArguments, run_conversion

REPO_ROOT = Path(__file__).resolve().parents[1]

# A tiny official-format model: 32 px images, 4 px patches (8x8 grid), encoder width 64 (4 heads, not in the
# official width table, so the head flag is exercised), MLP ratio 2 (so the MLP width must be read from the tensors).
WIDTH, DEPTH, MLP, PATCH, GRID, CHANNELS = 64, 2, 128, 4, 8, 3
PRED_WIDTH, PRED_DEPTH, PRED_MLP = 32, 2, 128
HEADS = 4
SECTIONS = ("encoder", "predictor", "target_encoder")


def _official_block(generator, prefix: str, width: int, mlp: int) -> dict[str, torch.Tensor]:
    def rand(*shape, scale=0.1, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=generator)

    return {
        f"{prefix}norm1.weight": rand(width, offset=1.0), f"{prefix}norm1.bias": rand(width),
        f"{prefix}attn.qkv.weight": rand(3 * width, width), f"{prefix}attn.qkv.bias": rand(3 * width),
        f"{prefix}attn.proj.weight": rand(width, width), f"{prefix}attn.proj.bias": rand(width),
        f"{prefix}norm2.weight": rand(width, offset=1.0), f"{prefix}norm2.bias": rand(width),
        f"{prefix}mlp.fc1.weight": rand(mlp, width), f"{prefix}mlp.fc1.bias": rand(mlp),
        f"{prefix}mlp.fc2.weight": rand(width, mlp), f"{prefix}mlp.fc2.bias": rand(width),
    }


def official_encoder_state_dict(generator) -> dict[str, torch.Tensor]:
    """Official `VisionTransformer.state_dict()` names, in its order. Position tables random (not sin-cos) so a converter or
    loader that re-creates them instead of carrying them is caught."""
    sd = {
        "pos_embed": torch.randn(1, GRID * GRID, WIDTH, generator=generator),
        "patch_embed.proj.weight": 0.1 * torch.randn(WIDTH, CHANNELS, PATCH, PATCH, generator=generator),
        "patch_embed.proj.bias": 0.1 * torch.randn(WIDTH, generator=generator),
    }
    for index in range(DEPTH):
        sd.update(_official_block(generator, f"blocks.{index}.", WIDTH, MLP))
    sd["norm.weight"] = 1 + 0.1 * torch.randn(WIDTH, generator=generator)
    sd["norm.bias"] = 0.1 * torch.randn(WIDTH, generator=generator)
    return sd


def official_predictor_state_dict(generator) -> dict[str, torch.Tensor]:
    """Official `VisionTransformerPredictor.state_dict()` names, in its order."""
    sd = {  # the module's own parameters first (registration order), then its children's
        "mask_token": torch.randn(1, 1, PRED_WIDTH, generator=generator),
        "predictor_pos_embed": torch.randn(1, GRID * GRID, PRED_WIDTH, generator=generator),
        "predictor_embed.weight": 0.1 * torch.randn(PRED_WIDTH, WIDTH, generator=generator),
        "predictor_embed.bias": 0.1 * torch.randn(PRED_WIDTH, generator=generator),
    }
    for index in range(PRED_DEPTH):
        sd.update(_official_block(generator, f"predictor_blocks.{index}.", PRED_WIDTH, PRED_MLP))
    sd.update({
        "predictor_norm.weight": 1 + 0.1 * torch.randn(PRED_WIDTH, generator=generator),
        "predictor_norm.bias": 0.1 * torch.randn(PRED_WIDTH, generator=generator),
        "predictor_proj.weight": 0.1 * torch.randn(WIDTH, PRED_WIDTH, generator=generator),
        "predictor_proj.bias": 0.1 * torch.randn(WIDTH, generator=generator),
    })
    return sd


def official_checkpoint(ddp_prefix: bool, seed: int = 0) -> dict:
    """What the official `train.py` `save_checkpoint` writes (`module.` from DistributedDataParallel)."""
    generator = torch.Generator().manual_seed(seed)
    prefix = "module." if ddp_prefix else ""
    sections = {
        "encoder": official_encoder_state_dict(generator),
        "predictor": official_predictor_state_dict(generator),
        "target_encoder": official_encoder_state_dict(generator),
    }
    checkpoint = {name: {prefix + k: v for k, v in sd.items()} for name, sd in sections.items()}
    checkpoint.update(opt={"state": {}, "param_groups": []}, scaler=None, epoch=7, loss=0.123, batch_size=16,
                      world_size=2, lr=0.001)
    return checkpoint




class ConvertCommand:
    """What `scripts/convert_ijepa_checkpoint.py ARGV` computes, in process (its arguments, then `run_conversion`)."""

    @staticmethod
    def main(argv: list[str]) -> dict:
        from transformers import HfArgumentParser

        (args,) = HfArgumentParser(ConversionArguments).parse_args_into_dataclasses(args=argv)
        return run_conversion(args)


@pytest.fixture(scope="module")
def convert_script():
    return ConvertCommand()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, convert_script):
    """One conversion with the `module.` prefix: official file, our directory, exported target encoder."""
    root = tmp_path_factory.mktemp("converted")
    checkpoint = official_checkpoint(ddp_prefix=True)
    torch.save(checkpoint, root / "IN1K-vit.synthetic-7e.pth.tar")
    report = convert_script.main([
        "--checkpoint", str(root / "IN1K-vit.synthetic-7e.pth.tar"), "--output_dir", str(root / "pretraining"),
        "--export_encoder", str(root / "encoder"), "--num_attention_heads", str(HEADS),
    ])
    return root, checkpoint, report


def test_convert__infers_architecture_from_tensors(converted):
    root, _, report = converted
    config = json.loads((root / "pretraining" / "config.json").read_text())
    expected = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
                    image_size=GRID * PATCH, patch_size=PATCH, num_channels=CHANNELS, layer_norm_eps=1e-6,
                    qkv_bias=True, pred_hidden_size=PRED_WIDTH, pred_num_hidden_layers=PRED_DEPTH,
                    pred_num_attention_heads=HEADS, pred_mlp_ratio=PRED_MLP / PRED_WIDTH)
    assert {key: config[key] for key in expected} == expected
    assert report["ddp_prefix"] is True and report["epoch"] == 7
    assert report["max_abs_diff_after_reload"] == {"encoder": 0.0, "predictor": 0.0, "target_encoder": 0.0}


def test_convert__weights_land_where_the_official_code_uses_them(converted):
    root, checkpoint, _ = converted
    model = IJepaForPreTraining.from_pretrained(root / "pretraining")
    official = checkpoint["encoder"]
    attention = model.context_encoder.layers[1].attention
    # Official `Attention.forward`: qkv output reshaped (3, heads, head_dim) -> rows [0:D] q, [D:2D] k, [2D:3D] v.
    for index, projection in enumerate((attention.q_proj, attention.k_proj, attention.v_proj)):
        rows = slice(index * WIDTH, (index + 1) * WIDTH)
        assert torch.equal(projection.weight, official["module.blocks.1.attn.qkv.weight"][rows])
        assert torch.equal(projection.bias, official["module.blocks.1.attn.qkv.bias"][rows])
    assert torch.equal(model.ijepa.embeddings.position_embeddings, checkpoint["target_encoder"]["module.pos_embed"])
    assert torch.equal(model.predictor.position_embeddings, checkpoint["predictor"]["module.predictor_pos_embed"])
    assert torch.equal(model.predictor.mask_token, checkpoint["predictor"]["module.mask_token"])


def test_convert__outputs_match_reference_forward_of_official_tensors(converted):
    root, checkpoint, report = converted
    model = IJepaForPreTraining.from_pretrained(root / "pretraining")
    inputs = conv.verification_inputs(model.config, batch_size=3, seed=5)
    ours = conv.model_outputs(model, *inputs)
    reference = conv.official_outputs(checkpoint, model.config, *inputs)
    for name in SECTIONS:
        assert ours[name].shape == reference[name].shape
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-4)
    assert max(report["max_abs_diff_vs_official_reference"].values()) < 1e-4


@pytest.mark.parametrize("ddp_prefix", [True, False], ids=["module_prefix", "no_prefix"])
def test_convert__round_trip_to_official_is_bitwise(tmp_path, convert_script, ddp_prefix):
    checkpoint = official_checkpoint(ddp_prefix=ddp_prefix, seed=1)
    torch.save(checkpoint, tmp_path / "official.pth.tar")
    report = convert_script.main(["--checkpoint", str(tmp_path / "official.pth.tar"), "--output_dir",
                                  str(tmp_path / "ours"), "--num_attention_heads", str(HEADS)])
    assert report["ddp_prefix"] is ddp_prefix
    extra = [] if ddp_prefix else ["--no_ddp_prefix"]
    convert_script.main(["--to_official", "--checkpoint", str(tmp_path / "ours"), "--output_file",
                         str(tmp_path / "back.pth.tar"), "--epoch", "7", *extra])
    back = torch.load(tmp_path / "back.pth.tar", weights_only=True)
    for section in SECTIONS:
        assert list(back[section]) == list(checkpoint[section]), section  # same keys, same order
        for key, tensor in checkpoint[section].items():
            assert back[section][key].dtype == tensor.dtype
            assert torch.equal(back[section][key], tensor), f"{section}.{key}"
    assert back["epoch"] == 7 and back["opt"] is None


def test_convert__unknown_key_is_refused(tmp_path):
    checkpoint = official_checkpoint(ddp_prefix=True)
    checkpoint["encoder"]["module.blocks.0.attn.extra_scale"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.extra_scale"):
        conv.official_to_model(checkpoint, num_attention_heads=HEADS)


def test_convert__missing_key_is_refused():
    checkpoint = official_checkpoint(ddp_prefix=False)
    del checkpoint["predictor"]["predictor_blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"missing keys.*predictor\.layers\.1\.mlp\.fc2\.bias"):
        conv.official_to_model(checkpoint, num_attention_heads=HEADS)


def test_convert__mixed_prefix_and_missing_section_are_refused(tmp_path):
    checkpoint = official_checkpoint(ddp_prefix=True)
    checkpoint["encoder"]["norm.weight"] = checkpoint["encoder"].pop("module.norm.weight")
    with pytest.raises(ValueError, match="mixes keys"):
        conv.official_to_model(checkpoint, num_attention_heads=HEADS)
    torch.save({"encoder": {}, "epoch": 1}, tmp_path / "partial.pth.tar")
    with pytest.raises(ValueError, match=r"lacks \['predictor', 'target_encoder'\]"):
        conv.load_official_checkpoint(tmp_path / "partial.pth.tar")


def test_convert__heads_from_official_width_table_or_flag():
    checkpoint = official_checkpoint(ddp_prefix=False)
    sections, _ = conv.official_sections(checkpoint)
    with pytest.raises(ValueError, match="--num_attention_heads"):
        conv.infer_config(sections)  # width 64 is not an official size
    assert conv.infer_config(sections, num_attention_heads=2, pred_num_attention_heads=8).pred_num_attention_heads == 8
    # ViT-H width: 16 heads from the table, and the predictor inherits them (official init_model).
    huge = {name: dict(sd) for name, sd in sections.items()}
    for name in ("encoder", "target_encoder"):
        huge[name]["patch_embed.proj.weight"] = torch.zeros(1280, 3, 14, 14)
        huge[name]["blocks.0.attn.qkv.weight"] = torch.zeros(3 * 1280, 1280)
        huge[name]["pos_embed"] = torch.zeros(1, 256, 1280)
    huge["predictor"]["predictor_embed.weight"] = torch.zeros(384, 1280)
    huge["predictor"]["predictor_blocks.0.mlp.fc1.weight"] = torch.zeros(1536, 384)
    config = conv.infer_config(huge)
    assert (config.num_attention_heads, config.pred_num_attention_heads, config.image_size) == (16, 16, 224)


def test_convert__key_map_has_one_rule_per_official_name():
    """Every official tensor name matches exactly one rule (declarative map, no overlaps)."""
    checkpoint = official_checkpoint(ddp_prefix=False)
    for section, rules in conv.KEY_MAPS.items():
        for key in checkpoint[section]:
            hits = [rule for rule in rules if conv._template_regex(rule.official).match(key)]
            assert len(hits) == 1, (section, key, hits)


# ---------------------------------------------------------------------------------------------------------------------
# Loading without this package: plain transformers for the exported encoder, remote code for the pretraining dir.


def run_without_package(code: str, tmp_path: Path) -> None:
    """Run `code` in a fresh interpreter where `import modeling_ijepa` fails (the package is pip-installed in
    editable mode, so it is blocked in sys.modules) and remote code is cached under tmp_path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"),
               TOKENIZERS_PARALLELISM="false")
    prelude = textwrap.dedent("""
        import sys
        sys.modules["modeling_ijepa"] = None  # any import of this package now raises ImportError
        try:
            import modeling_ijepa
        except ImportError:
            pass
        else:
            raise SystemExit("modeling_ijepa is importable; the test would not prove anything")
    """)
    result = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.mark.slow  # a fresh Python process importing torch + transformers (~30 s on 2 shared cores)
def test_exported_encoder_loads_in_plain_transformers_and_pipeline(converted, tmp_path):
    root, _, _ = converted
    encoder_dir = root / "encoder"
    config = json.loads((encoder_dir / "config.json").read_text())
    assert "auto_map" not in config and not any(key.startswith(("pred_", "num_target")) for key in config)
    assert not list(encoder_dir.glob("*.py"))
    image = Image.fromarray(torch.randint(0, 256, (40, 52, 3), generator=torch.Generator().manual_seed(0))
                            .to(torch.uint8).numpy())
    image.save(tmp_path / "image.png")
    run_without_package(f"""
        import torch, transformers
        from PIL import Image
        from transformers import AutoImageProcessor, AutoModel, pipeline
        image = Image.open({str(tmp_path / 'image.png')!r})
        model = AutoModel.from_pretrained({str(encoder_dir)!r})
        assert type(model) is transformers.IJepaModel, type(model)
        processor = AutoImageProcessor.from_pretrained({str(encoder_dir)!r})
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model(pixel_values).last_hidden_state
        extractor = pipeline("image-feature-extraction", model={str(encoder_dir)!r})
        piped = torch.tensor(extractor(image))
        torch.save({{"pixel_values": pixel_values, "features": features, "piped": piped}},
                   {str(tmp_path / 'plain.pt')!r})
    """, tmp_path)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain["pixel_values"].shape == (1, CHANNELS, GRID * PATCH, GRID * PATCH)  # resized + center-cropped
    model = IJepaForPreTraining.from_pretrained(root / "pretraining").eval()
    with torch.no_grad():
        ours = model.ijepa(plain["pixel_values"]).last_hidden_state  # the target encoder (default --which)
    assert ours.shape == (1, GRID * GRID, WIDTH)
    torch.testing.assert_close(plain["features"], ours, rtol=0, atol=1e-5)
    torch.testing.assert_close(plain["piped"], ours, rtol=0, atol=1e-5)


@pytest.mark.slow  # a fresh Python process importing torch + transformers (~30 s on 2 shared cores)
def test_pretraining_dir_loads_with_remote_code_without_package(converted, tmp_path):
    root, _, _ = converted
    directory = root / "pretraining"
    assert {"modeling_ijepa.py", "configuration_ijepa.py", "masking_ijepa.py"} <= {p.name for p in directory.iterdir()}
    auto_map = json.loads((directory / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForPreTraining"] == "modeling_ijepa.IJepaForPreTraining"
    assert auto_map["AutoModel"] == "modeling_ijepa.IJepaModel"

    # Negative control: the same directory whose modeling file does not register the 4.x-key renames (the trap of
    # the issue: renames living in the package __init__, which the Hub does not copy). Its remote-code load must
    # give different numbers, or this test could not catch randomly initialised weights.
    sabotaged = tmp_path / "without_renames"
    shutil.copytree(directory, sabotaged)
    modeling_file = sabotaged / "modeling_ijepa.py"
    source = modeling_file.read_text()
    calls = source.count("register_checkpoint_conversion_mapping(")
    assert calls >= 1
    source = source.replace("register_checkpoint_conversion_mapping(", "_skip_registration(").replace(
        "from __future__ import annotations\n",
        "from __future__ import annotations\n\ndef _skip_registration(*args, **kwargs):\n    return None\n", 1)
    modeling_file.write_text(source)

    model = IJepaForPreTraining.from_pretrained(directory).eval()
    pixel_values, context_mask, target_mask = conv.verification_inputs(model.config, batch_size=2, seed=3)
    torch.save({"pixel_values": pixel_values, "context_mask": context_mask, "target_mask": target_mask},
               tmp_path / "inputs.pt")
    run_without_package(f"""
        import torch
        from transformers import AutoModel, AutoModelForPreTraining
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r}, weights_only=True)
        # First (renames are registered process-wide by class name, so the good copy must not load before it).
        broken = AutoModelForPreTraining.from_pretrained({str(sabotaged)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            broken_loss = broken(**inputs).loss
        model = AutoModelForPreTraining.from_pretrained({str(directory)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        encoder = AutoModel.from_pretrained({str(directory)!r}, trust_remote_code=True).eval()
        assert type(encoder).__module__.startswith("transformers_modules."), type(encoder).__module__
        with torch.no_grad():
            out = model(**inputs)
            pooled = encoder(inputs["pixel_values"]).pooler_output
        torch.save({{"loss": out.loss, "predicted": out.predicted_hidden_states, "targets": out.target_hidden_states,
                    "pooled": pooled, "broken_loss": broken_loss}}, {str(tmp_path / 'remote.pt')!r})
    """, tmp_path)
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    with torch.no_grad():
        local = model(pixel_values, context_mask=context_mask, target_mask=target_mask)
        pooled = model.ijepa(pixel_values).pooler_output
    torch.testing.assert_close(remote["loss"], local.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(remote["predicted"], local.predicted_hidden_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(remote["targets"], local.target_hidden_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(remote["pooled"], pooled, rtol=0, atol=1e-5)
    # The comparison tells weights apart: without the renames in the modeling file the loss is clearly different.
    assert abs(float(remote["broken_loss"]) - float(local.loss)) > 1e-3
