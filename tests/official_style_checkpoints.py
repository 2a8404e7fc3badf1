"""Write an encoder directory like `scripts/convert_ijepa_checkpoint.py --export_encoder` does for Meta's checkpoints
(a plain transformers `ijepa` encoder plus `convert_official.eval_image_processor`: resize the short side to 256,
center crop 224, bicubic, ImageNet mean/std), at the official 224 px / patch 16 but tiny width and depth."""

import torch

from modeling_ijepa import IJepaForPreTraining, ijepa_config_from_preset
from modeling_ijepa import convert_official as conv

OFFICIAL_IMAGE_SIZE, OFFICIAL_PATCH_SIZE = 224, 16
HIDDEN_SIZE = 32


def save_official_style_encoder(directory, seed: int = 0):
    config = ijepa_config_from_preset(
        "tiny-cpu", image_size=OFFICIAL_IMAGE_SIZE, patch_size=OFFICIAL_PATCH_SIZE, hidden_size=HIDDEN_SIZE,
        num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, pred_hidden_size=16,
        pred_num_hidden_layers=1, pred_num_attention_heads=4,
    )
    torch.manual_seed(seed)
    encoder = conv.export_encoder(IJepaForPreTraining(config), "target")
    encoder.save_pretrained(directory)
    processor = conv.eval_image_processor(config)
    assert processor.size["shortest_edge"] == 256 and processor.crop_size["height"] == 224
    processor.save_pretrained(directory)
    return directory
