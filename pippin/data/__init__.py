"""Data sets and filters for training: generated prompt sets and decontamination against benchmarks."""
