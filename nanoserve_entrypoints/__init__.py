"""The ways in: the offline command line (cli.py) and the OpenAI-compatible server (openai.py)."""
