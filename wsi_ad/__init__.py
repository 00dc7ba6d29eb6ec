"""wsi-ad: metastasis detection in whole-slide images by anomaly detection (:mod:`wsi_ad.detectors`: the
Deep Perceptual Autoencoder and the detectors that follow it, behind one interface).

The library is a set of plain stages (slide reading, tissue masking, stain normalization, tiling,
scoring, heatmaps, metrics) that know nothing of Dask; ``pipelines`` orchestrates them.
Every coordinate is in level-0 pixels (top-left, x then y) unless its name says otherwise.
"""

__version__ = "0.2.0"  # 0.2: detectors behind one interface, checkpoint format 2
