"""loraflow: LoRA/QLoRA fine-tuning and ROUGE evaluation as a Prefect flow."""

from loraflow import quiet

quiet.install()
