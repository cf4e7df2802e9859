"""The training engine. Never imports ComfyUI; usable headless (``python -m trainer``) and testable without it.

Read ``run.py`` first: one run's sequence (find the run, pre-flight, estimate, train, save). ``data/`` turns a folder
into cached latents, ``training/`` holds the loop and what a step needs, ``adapters/`` the LoRA network,
``hosts/`` the model interface, ``files/`` the file formats, ``monitor/`` what the user sees, ``preflight/`` the
checks and memory estimate. ARCHITECTURE.md at the repository root draws the map.
"""
