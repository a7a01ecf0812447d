"""Datasets: built-in (digits, mnist, fashion_mnist, shapes, breast_cancer) and users' data
(parquet_images, image_folder, tabular), all loaded as `ArrayDataset` through `load_dataset`."""
from engine.data.base import ArrayDataset
from engine.data.registry import (dataset_fingerprint, dataset_names, dataset_options, load_dataset,
                                  register_dataset)

__all__ = ["ArrayDataset", "dataset_fingerprint", "dataset_names", "dataset_options", "load_dataset",
           "register_dataset"]
