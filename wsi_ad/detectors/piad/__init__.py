"""PIAD, Perceptual Image Anomaly Detection: config section (:mod:`~wsi_ad.detectors.piad.config`), networks
(:mod:`~wsi_ad.detectors.piad.networks`: ``residual9`` encoder, generator and image critic, latent critic),
losses and gradient-norm weights (:mod:`~wsi_ad.detectors.piad.losses`) and the detector
(:mod:`~wsi_ad.detectors.piad.detector`), registered as ``piad``."""

from wsi_ad.detectors import register
from wsi_ad.detectors.piad.config import PIADConfig
from wsi_ad.detectors.piad.detector import PIAD

register(PIAD)

__all__ = ["PIAD", "PIADConfig"]
