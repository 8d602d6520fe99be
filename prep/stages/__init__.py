"""The API stages: the stage skeleton they share, the teacher, soft labels, predict, the on-policy mix, and the Axolotl dataset export."""
