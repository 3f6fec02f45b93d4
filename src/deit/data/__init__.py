"""Data: data sets, transform presets and loaders.

``datasets`` reads the images, ``transforms`` / ``augment`` / ``rand_augment`` change them, ``samplers``
order them, ``batch`` and ``batched`` group them, and ``loaders`` assembles a run's data from all of these.
"""

from deit.data.batch import Batch
from deit.data.datasets import DATASET_ALIASES, DataError, DatasetInfo, canonical_dataset_name, load_datasets
from deit.data.loaders import (
    DataBundle,
    Unlabeled,
    build_data,
    build_eval_data,
    build_pool_for_labelling,
    build_probe_data,
)
from deit.data.unlabeled import UNLABELED

__all__ = [
    "DATASET_ALIASES",
    "Batch",
    "DataBundle",
    "DataError",
    "DatasetInfo",
    "UNLABELED",
    "Unlabeled",
    "build_data",
    "build_pool_for_labelling",
    "build_probe_data",
    "build_eval_data",
    "canonical_dataset_name",
    "load_datasets",
]
