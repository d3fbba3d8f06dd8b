"""Text data: caption sourcing (`ip2p captions`), instruction generation (`ip2p instructions`) with
pluggable backends (template, local LM, OpenAI-compatible endpoint), the one completion validator,
and fine-tuning of the instruction LM (`ip2p finetune-llm`)."""
