"""Deep GEO, geometric-transformation classification with a Dirichlet normality score (Golan & El-Yaniv 2018; the
DPA paper's baseline), registered as ``deep_geo`` (:class:`~wsi_ad.detectors.deep_geo.detector.DeepGEO`)."""

from wsi_ad.detectors import register
from wsi_ad.detectors.deep_geo.config import DeepGEOConfig
from wsi_ad.detectors.deep_geo.detector import DeepGEO

register(DeepGEO)

__all__ = ["DeepGEO", "DeepGEOConfig"]
