"""Datasets for fine-tuning: image folders and bundled sets (Fashion-MNIST, mnist5k, digits), and segmentation data."""

from deltavision.data.build import DatasetSplits, build_datasets
from deltavision.data.bundled import BUNDLED_DATASETS, FASHION_MNIST_CLASSES
from deltavision.data.datasets import ArrayImageDataset, ImageFileDataset
from deltavision.data.folder import scan_image_folder, write_image_folder
from deltavision.data.images import IMAGE_EXTENSIONS, load_rgb_image, to_rgb
from deltavision.data.sampling import stratified_split, stratified_subset
from deltavision.data.scenes import SCENE_CLASSES, SceneArrays, load_scenes
from deltavision.data.segmentation import SegmentationSplits, build_segmentation_datasets
from deltavision.data.transforms import Augmentation, make_transforms

__all__ = [
    "Augmentation",
    "BUNDLED_DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "DatasetSplits",
    "ImageFileDataset",
    "SCENE_CLASSES",
    "SceneArrays",
    "SegmentationSplits",
    "build_datasets",
    "build_segmentation_datasets",
    "load_rgb_image",
    "load_scenes",
    "make_transforms",
    "scan_image_folder",
    "stratified_split",
    "stratified_subset",
    "to_rgb",
    "write_image_folder",
]
