"""The orchestrator: the pipeline plan, its steps, the recipe catalogue and the doctor; it imports what it runs."""
