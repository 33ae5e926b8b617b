"""The experiment tools: ``sasr compare`` (every method x seed on one model, data and budget), run reports and
their HTML page, paired intervals. The only package that imports the trainer."""
