"""overlaylab: multi-host Docker overlay clusters over SSH, and a lab to try them on."""

__version__ = "0.1.0"
