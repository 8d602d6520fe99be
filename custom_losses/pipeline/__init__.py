"""The orchestrator: the pipeline's recipe and plan, its steps and their one command table, the recipe catalogue; run.py runs the doctor, then the steps."""
