"""``wsi-ad view RUN_DIR``: a local web viewer of a run (deep zoom of the real slide pixels with the heatmap,
tissue mask and lesion outlines as layers, hotspots, the slide list and the ROC curve).

:mod:`pipelines.viewer.run` reads the run (nothing but what it wrote, and the slide files); :mod:`pipelines.viewer.app`
is the Flask application and its server.
"""

from pipelines.viewer.app import create_app, is_loopback, serve
from pipelines.viewer.run import RunView, ViewerError

__all__ = ["RunView", "ViewerError", "create_app", "is_loopback", "serve"]
