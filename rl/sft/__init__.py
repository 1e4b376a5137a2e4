"""Cold-start SFT (and the student side of distillation) on TRL's SFTTrainer."""
