"""The models nanoserve serves beyond the GPT-2 of nanoserve.py, and the one it ships.

    llama.py        the Llama family: Llama 2/3, Mistral without a sliding window, Qwen2, Qwen3
    train.py        trains the embedded GPT-2 (a script: python nanoserve_models/train.py --help)
    shakespeare/    that model, a Hugging Face GPT-2 folder (the default --model)

Read GPT-2 in nanoserve.py first: every model here shares its serving step (nanoserve.PagedLM).
"""
