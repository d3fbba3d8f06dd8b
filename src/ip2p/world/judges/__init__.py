"""The paper reproduced in miniature: the world's truth applied to the outputs of the pipeline's
stages (docs/miniature.md). The top of the package: it reads every stage's outputs, nothing imports it."""
