"""IGD, the Interpolated Gaussian Descriptor (Chen et al., AAAI 2022), registered as ``igd``
(:class:`~wsi_ad.detectors.igd.detector.IGD`)."""

from wsi_ad.detectors import register
from wsi_ad.detectors.igd.config import IGDConfig
from wsi_ad.detectors.igd.detector import IGD

register(IGD)

__all__ = ["IGD", "IGDConfig"]
