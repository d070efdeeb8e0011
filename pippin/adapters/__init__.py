"""LoRA adapters: wrap linear-like modules (lora.py), read and write PEFT's format (peft_format.py), and keep
many adapters ready for one base model (store.py). Acts on modules by name; never imports the model."""
