"""Training data: concept folders, captions, buckets, epoch plans, pixels, latent cache, class images."""

from .batching import BatchItem, batches_per_epoch, epoch_batches, global_batches, validation_batches
from .buckets import BucketSpec, bucket_for, bucket_list, bucket_spec
from .cache import LatentCache
from .captions import build_caption
from .class_images import ClassImageJob, generate_class_images, plan_class_images
from .pixels import load_mask, load_pixels
from .preview import dataset_preview
from .scan import DatasetPlan, ImageRecord, scan_dataset

__all__ = ["BatchItem", "BucketSpec", "ClassImageJob", "DatasetPlan", "ImageRecord",
           "LatentCache", "batches_per_epoch", "bucket_for", "bucket_list", "bucket_spec", "build_caption",
           "dataset_preview", "epoch_batches", "generate_class_images", "global_batches", "load_mask",
           "load_pixels", "plan_class_images", "scan_dataset", "validation_batches"]
