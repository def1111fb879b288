"""The network: the DDPM U-Net, its precision, the EMA of its weights."""
