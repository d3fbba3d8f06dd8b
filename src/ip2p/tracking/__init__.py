"""Stage 7: the model registry (ip2p.tracking.registry) and the served MLflow model
(ip2p.tracking.pyfunc_model). Run logging (MLflow, W&B) is infrastructure every stage uses:
ip2p.io.loggers."""
