"""Tacotron2 trainer: data, model, losses, optimisation, checkpoints and the training loop."""
