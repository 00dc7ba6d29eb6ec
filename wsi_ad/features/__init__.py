"""Frozen pretrained feature extractors shared by the detectors (the DPA's and PIAD's perceptual loss,
the feature kNN, Deep IF): backbones built by name (:mod:`~wsi_ad.features.backbones`), the
EfficientNet-Lite0 architecture (:mod:`~wsi_ad.features.efficientnet_lite`), and the relative perceptual
L1 with its feature statistics (:mod:`~wsi_ad.features.perceptual`)."""

from wsi_ad.features.backbones import BackboneError, FeatureExtractor, build_backbone, list_backbones

__all__ = ["BackboneError", "FeatureExtractor", "build_backbone", "list_backbones"]
