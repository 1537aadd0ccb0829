"""What a run leaves behind and how it is read back: metrics.jsonl, the progress display,
wandb, the plots, the sweep report, the model card, the PEFT export. Imports nothing itself."""
