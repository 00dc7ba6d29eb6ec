"""f-AnoGAN (Schlegl et al. 2019): config section (:mod:`~wsi_ad.detectors.fanogan.config`), networks
(:mod:`~wsi_ad.detectors.fanogan.networks`: WGAN-GP residual generator and critic, encoder) and the detector
(:mod:`~wsi_ad.detectors.fanogan.detector`), registered as ``fanogan``."""

from wsi_ad.detectors import register
from wsi_ad.detectors.fanogan.config import FAnoGANConfig
from wsi_ad.detectors.fanogan.detector import FAnoGAN

register(FAnoGAN)

__all__ = ["FAnoGAN", "FAnoGANConfig"]
