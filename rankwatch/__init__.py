"""rankwatch: observability and straggler detection for large GPU training jobs.

The training-side API is importable without torch, Prometheus or any service::

    import rankwatch
    probe = rankwatch.Probe(run="llama70b-cpt")
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Probe", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import rankwatch` in a training script costs nothing until the probe is used.
    if name == "Probe":
        from rankwatch.exporters.probe import Probe

        return Probe
    raise AttributeError(f"module 'rankwatch' has no attribute {name!r}")
