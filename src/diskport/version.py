"""The version of diskport, in a leaf module: low layers (net/, sources/, oci/) read it without importing the
package face, which imports the engine and the format readers."""

__version__ = "0.1.0"
