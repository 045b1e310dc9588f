"""dyadfs: DYAD's producer/consumer data movement for HPC workflows, as a FUSE filesystem."""

__version__ = "0.1.0"
