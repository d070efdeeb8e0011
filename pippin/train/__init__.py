"""Training: adapters on a frozen base (SFT, distillation for accuracy recovery), with resumable checkpoints.
Sits on top of model, quant, adapters and engine; nothing below imports it."""
