"""CroBIM-U: uncertainty-driven referring segmentation for remote-sensing images."""
