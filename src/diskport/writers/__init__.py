"""Writers: take guest-ordered data and zero runs, produce a target format. Nothing format-specific goes in."""

from diskport.names import OUTPUT_FORMATS
from diskport.writers.base import Writer
from diskport.writers.qcow2 import Qcow2Writer
from diskport.writers.raw import RawWriter

__all__ = ["OUTPUT_FORMATS", "Qcow2Writer", "RawWriter", "Writer"]
