"""Deep IF, pooled ImageNet CNN features and an Isolation Forest (Ouardini et al. 2019; the DPA paper's baseline),
registered as ``deep_if`` (:class:`~wsi_ad.detectors.deep_if.detector.DeepIF`)."""

from wsi_ad.detectors import register
from wsi_ad.detectors.deep_if.config import DeepIFConfig
from wsi_ad.detectors.deep_if.detector import DeepIF

register(DeepIF)

__all__ = ["DeepIF", "DeepIFConfig"]
