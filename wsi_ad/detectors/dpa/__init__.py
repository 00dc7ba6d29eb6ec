"""The Deep Perceptual Autoencoder (DPA): config section (:mod:`~wsi_ad.detectors.dpa.config`), networks
(:mod:`~wsi_ad.detectors.dpa.networks`: the official ``residual18`` and the lighter ``shallow``), the
progressive-growing schedule (:mod:`~wsi_ad.detectors.dpa.schedule`) and the detector
(:mod:`~wsi_ad.detectors.dpa.detector`), registered as ``dpa``."""

from wsi_ad.detectors import register
from wsi_ad.detectors.dpa.config import DPAConfig
from wsi_ad.detectors.dpa.detector import DPA

register(DPA)

__all__ = ["DPA", "DPAConfig"]
