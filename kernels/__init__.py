"""Stateless tensor math (torch only, no ComfyUI import)."""
