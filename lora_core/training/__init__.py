"""Training: the LoRA layer, PEFT setup, the loss, attention and the HF Trainer loop."""
