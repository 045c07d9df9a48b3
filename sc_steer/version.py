"""The library version, recorded in the manifests and run files it writes."""
__version__ = "0.1.0"
