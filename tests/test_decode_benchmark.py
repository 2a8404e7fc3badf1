"""The `decode` benchmark section (modeling_ijepa/benchmarks/decode.py) on 4 images: fields and outputs, never timings."""

from modeling_ijepa.benchmarks.decode import decode_benchmark, format_decode_table, make_jpeg_folder


def test_decode_section__fields_and_same_crop_geometry_uint8_vs_float():
    result = decode_benchmark(num_images=4, passes=1)
    for name in ("ours", "ours_pil", "ours_draft", "official"):
        assert result[f"{name}_images_per_s"] > 0 and result[f"{name}_ratio"] > 0
    # Same crop geometry family: 224x224 RGB batches; ours stays uint8 until the device, the official one is float.
    for name in ("ours", "ours_pil", "ours_draft"):
        assert result[f"{name}_output"] == {"shape": [4, 3, 224, 224], "dtype": "uint8"}
    assert result["official_output"] == {"shape": [4, 3, 224, 224], "dtype": "float32"}
    assert result["pil_max_abs_diff"] <= 1  # torchvision decode + torch resize vs PIL: within one level
    assert result["draft_shrunk_files"] == 0 and result["draft_max_abs_diff"] == 0  # 500x375 < 2 x 224 a side
    table = format_decode_table(result)
    assert table.count("\n| ") == 4 and "/ official" in table


def test_make_jpeg_folder__imagenet_size_jpegs_from_skimage_photos(tmp_path):
    from PIL import Image

    paths = make_jpeg_folder(tmp_path, count=3)
    sizes = [Image.open(p).size for p in paths]
    assert sizes == [(375, 500), (500, 375), (500, 375)]
    assert all(Image.open(p).format == "JPEG" for p in paths)
