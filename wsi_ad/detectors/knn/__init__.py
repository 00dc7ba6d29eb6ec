"""The feature kNN baseline: PatchCore's coreset memory bank of mid-level ImageNet patch features (Roth et al.,
CVPR 2022), registered as ``knn`` (:class:`~wsi_ad.detectors.knn.detector.FeatureKNN`)."""

from wsi_ad.detectors import register
from wsi_ad.detectors.knn.config import KNNConfig
from wsi_ad.detectors.knn.detector import FeatureKNN

register(FeatureKNN)

__all__ = ["FeatureKNN", "KNNConfig"]
