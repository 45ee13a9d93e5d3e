"""Hydra configs of fcmae-pretrain (packaged as fcmae.conf in wheels)."""
