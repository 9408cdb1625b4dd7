"""The ``trimode`` command line."""
