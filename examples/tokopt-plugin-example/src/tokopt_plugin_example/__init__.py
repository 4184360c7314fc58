"""An example tokopt plugin.  Importing this package imports nothing heavy."""

__version__ = "0.1.0"
