"""LoRA fine-tuning of plain and routed Llamas on GLUE, with paired statistics: `python -m finetune --help`."""
