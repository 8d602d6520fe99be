"""Evaluation: the score table against the teacher, the validated submission, training curves."""
