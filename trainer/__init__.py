"""The training engine. Never imports ComfyUI; usable headless (`python -m trainer`) and testable without it."""
