"""gps-seg for PyTorch users: read GPS artifacts and runs, merge a delta into a state dict.

The ``gps-seg`` command (the Rust binary installed by the same wheel) selects and fine-tunes;
this package, which needs only numpy and safetensors, brings its results to a PyTorch model::

    import gps_seg
    art = gps_seg.load_artifact("runs/gps-k1/gps")      # gps_config.json + selection + delta
    sd = gps_seg.apply_delta(model.state_dict(), art)   # = `gps-seg merge`, bit for bit
    model.load_state_dict(sd)

``apply_delta`` refuses a base whose content hash differs from the one the artifact was made for.
"""

from ._artifact import Artifact, GpsSegError, TensorSpec, load_artifact
from ._merge import apply_delta, content_hash
from ._summary import RunSummary, read_summary

__all__ = [
    "Artifact",
    "GpsSegError",
    "RunSummary",
    "TensorSpec",
    "apply_delta",
    "content_hash",
    "load_artifact",
    "read_summary",
]
