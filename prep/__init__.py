"""Data in: competition cases, teacher answers and soft labels, shaped for training and inference."""
