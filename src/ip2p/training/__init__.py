"""Training: the LightningModule (UNet objective, conditioning dropout, EMA), the data module
(Parquet or released layout), callbacks, and the `ip2p train` stage."""
