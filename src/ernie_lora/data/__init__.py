"""Datasets: folders and checks, aspect buckets, latent and text-embedding caches."""

from .buckets import Bucket, make_buckets, nearest_bucket, resize_and_crop
from .dataset import DatasetReport, Finding, Item, check_dataset, load_rgb

__all__ = [
    "Bucket",
    "DatasetReport",
    "Finding",
    "Item",
    "check_dataset",
    "load_rgb",
    "make_buckets",
    "nearest_bucket",
    "resize_and_crop",
]
