"""The plain autoencoder baseline with an L2 or SSIM loss (Bergmann et al. 2019), registered as ``ae``
(:class:`~wsi_ad.detectors.ae.detector.Autoencoder`)."""

from wsi_ad.detectors import register
from wsi_ad.detectors.ae.config import AEConfig
from wsi_ad.detectors.ae.detector import Autoencoder

register(Autoencoder)

__all__ = ["AEConfig", "Autoencoder"]
