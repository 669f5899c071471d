"""embseg: large-vocabulary semantic segmentation with embedding heads (Jain et al., ICCV 2021)."""

__version__ = "0.1.0"
