"""Datasets: built-in (digits, mnist, fashion_mnist, shapes, breast_cancer) and users' data
(parquet_images, image_folder, tabular, text), all loaded as `ArrayDataset` through `load_dataset`, or
opened for block-wise reads through `open_split` (the users' formats stream; built-ins stay in memory)."""
from engine.data.base import ArrayDataset
from engine.data.registry import (dataset_fingerprint, dataset_names, dataset_options, load_dataset,
                                  register_dataset)
from engine.data.source import SplitSource, open_split

__all__ = ["ArrayDataset", "SplitSource", "dataset_fingerprint", "dataset_names", "dataset_options",
           "load_dataset", "open_split", "register_dataset"]
