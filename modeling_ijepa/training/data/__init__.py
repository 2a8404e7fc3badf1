"""The pretraining data path, one module per stage:

* `sources`: where records come from (`datasets.load_dataset` with clear errors, samples per epoch, image column);
* `order`: in what order each process and DataLoader worker reads them;
* `decode`: how a record becomes pixels (decode, RGB, the official crop and augmentation, seeded per record);
* `batches`: how workers make uint8 batches with their masks and the data position after each;
* `loader`: how batches reach the training loop (the `DataLoader`, its saved position, worker errors, normalisation).
"""

from ...masking_ijepa import derive_seed
from .batches import (
    BatchIndexedMaskCollator, BatchInfo, BatchMaker, BatchTicket, DataState, EpochBatchSampler, MapBatchDataset,
    ReaderPosition, StreamBatchDataset, batch_fingerprint, data_state_from_dict,
)
from .decode import (
    DECODE_ERRORS, AugmentationSettings, RecordAugmenter, augment, decode_image, decode_jpeg_tensor,
    draft_would_shrink, jpeg_bytes, record_name, to_rgb,
)
from .loader import DataWorkerError, ImageBatchStream, PixelNormalizer, default_num_workers, normalize
from .order import IndexedRecords, ShardedRecords, distributed_sampler_order, shard_for_process
from .sources import (
    FASHION_MNIST_HUB_IDS, KNOWN_TRAIN_SIZES, DatasetAccessError, access_instructions, count_train_samples,
    detect_image_column, load_train_dataset, load_training_images, local_fashion_mnist, local_image_files,
)

__all__ = [
    "AugmentationSettings", "BatchIndexedMaskCollator", "BatchInfo", "BatchMaker", "BatchTicket", "DECODE_ERRORS",
    "DataState", "DataWorkerError", "DatasetAccessError", "EpochBatchSampler", "FASHION_MNIST_HUB_IDS",
    "ImageBatchStream", "IndexedRecords", "KNOWN_TRAIN_SIZES", "MapBatchDataset", "PixelNormalizer", "ReaderPosition",
    "RecordAugmenter", "ShardedRecords", "StreamBatchDataset", "access_instructions", "augment", "batch_fingerprint",
    "count_train_samples", "data_state_from_dict", "decode_image", "decode_jpeg_tensor", "default_num_workers",
    "derive_seed", "detect_image_column", "distributed_sampler_order", "draft_would_shrink", "jpeg_bytes",
    "load_train_dataset", "load_training_images", "local_fashion_mnist", "local_image_files", "normalize",
    "record_name", "shard_for_process", "to_rgb",
]
